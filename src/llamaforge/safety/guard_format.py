"""Guard prompt formats: Meta's Llama Guard 3 and 4 prompts.

A format turns a conversation (alternating user / agent turns) and a category list into prompt parts for
`tokenizer.chat.encode_parts`: structure text (control tokens recognised there only) and message contents (plain
text, never control tokens). `lead` is what the model writes before its verdict word ("safe" / "unsafe"): Llama
Guard 3's template ends at the assistant header, and the model first writes "\\n\\n".

Llama Guard 3 follows the chat template Meta ships with the weights (tests/data/llama_guard_3_chat_template.jinja,
rendered in tests/test_safety_guard.py for exact parity): role 'User' or 'Agent' by the parity of the
conversation length, "S<n>: <name>." category lines without the excluded codes, each turn "<Role>: <trimmed
content>" followed by a blank line.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..errors import InvalidRequestError
from ..tokenizer.chat import Part
from .categories import Category

ROLES = ("user", "agent")


def conversation_turns(messages: Sequence[dict] | str, role: str = "user") -> list[tuple[str, str]]:
    """[(speaker, text)] alternating "user"/"agent", starting with the user, ending with `role`.

    A plain string is one turn spoken by `role` (an agent turn gets an empty user turn before it only when
    there is nothing else: Llama Guard needs the conversation to start with the user). System and tool
    messages are left out (the guard judges what users and the assistant say; tool output goes through the
    injection filter), consecutive turns of one speaker are joined.
    """
    if role not in ROLES:
        raise InvalidRequestError(f"role must be 'user' or 'agent', got {role!r}", field="role")
    if isinstance(messages, str):
        return [("user", "")] + [("agent", messages)] if role == "agent" else [("user", messages)]
    turns: list[tuple[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content", ""), (str, type(None))):
            raise InvalidRequestError(f"messages[{i}] must be an object with a string 'content'", field="messages")
        r = m.get("role")
        speaker = {"user": "user", "assistant": "agent", "agent": "agent"}.get(r)
        if speaker is None:
            continue
        text = m.get("content") or ""
        if turns and turns[-1][0] == speaker:
            turns[-1] = (speaker, turns[-1][1] + "\n\n" + text)
        else:
            turns.append((speaker, text))
    while turns and turns[0][0] != "user":
        turns.pop(0)
    if not turns:
        raise InvalidRequestError("no user or assistant message to check", field="messages")
    if turns[-1][0] != role:
        raise InvalidRequestError(f"the conversation must end with a {'user' if role == 'user' else 'assistant'} "
                                  f"message to check its {role} turn", field="messages")
    return turns


@dataclass(frozen=True)
class GuardFormat:
    """How one family of guard models is prompted. Subclasses implement `parts`."""

    name: str = "guard"
    lead: str = ""                      # text the model writes before the verdict word
    safe_word: str = "safe"
    unsafe_word: str = "unsafe"
    required_tokens: tuple[str, ...] = ()  # control tokens the vocabulary must have

    def parts(self, turns: list[tuple[str, str]], categories: Sequence[Category]) -> list[Part]:
        raise NotImplementedError

    def render(self, turns, categories) -> str:
        """The prompt as text (control tokens shown): what the parity test compares with Meta's template."""
        return "".join(t for t, _, _ in self.parts(turns, categories))


def _category_lines(categories: Sequence[Category]) -> str:
    out = []
    for c in categories:
        line = f"{c.code}: {c.name}."
        if c.description:
            line += "\n" + c.description
        out.append(line + "\n")
    return "".join(out)


@dataclass(frozen=True)
class LlamaGuardFormat(GuardFormat):
    """Meta's Llama Guard prompt, parametrised by the header tokens (Llama 3 for Guard 3, Llama 4 for Guard 4)."""

    bos: str = "<|begin_of_text|>"
    header_start: str = "<|start_header_id|>"
    header_end: str = "<|end_header_id|>"
    eot: str = "<|eot_id|>"
    task_wording: str = "according our safety policy"
    eot_spacing: str = " "     # between the last instruction line and the end-of-turn token
    tail: str = ""             # after the assistant header

    def parts(self, turns, categories):
        who = "Agent" if turns[-1][0] == "agent" else "User"
        head = (f"{self.bos}{self.header_start}user{self.header_end}\n\n"
                f"Task: Check if there is unsafe content in '{who}' messages in conversations "
                f"{self.task_wording} with the below categories.\n\n"
                f"<BEGIN UNSAFE CONTENT CATEGORIES>\n{_category_lines(categories)}<END UNSAFE CONTENT CATEGORIES>\n\n"
                f"<BEGIN CONVERSATION>\n\n")
        parts: list[Part] = [(head, False, False)]
        for speaker, text in turns:
            parts += [("Agent: " if speaker == "agent" else "User: ", False, False),
                      (text.strip(), True, False), ("\n\n", False, False)]
        parts.append((f"<END CONVERSATION>\n\n"
                      f"Provide your safety assessment for ONLY THE LAST {who} message in the above conversation:\n"
                      f" - First line must read 'safe' or 'unsafe'.\n"
                      f" - If unsafe, a second line must include a comma-separated list of violated categories."
                      f"{self.eot_spacing}{self.eot}{self.header_start}assistant{self.header_end}{self.tail}",
                      False, False))
        return parts


LLAMA_GUARD_3 = LlamaGuardFormat(name="llama-guard-3", lead="\n\n",
                                 required_tokens=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                                  "<|eot_id|>"))

# Llama Guard 4 (Llama 4 header tokens; Meta's documented text-only prompt). Its weights need the Llama 4
# architecture, which llamaforge's model core does not run: loading one fails in formats/ with a named error.
LLAMA_GUARD_4 = LlamaGuardFormat(name="llama-guard-4", lead="", bos="<|begin_of_text|>",
                                 header_start="<|header_start|>", header_end="<|header_end|>", eot="<|eot|>",
                                 task_wording="according to our safety policy", eot_spacing="", tail="\n\n",
                                 required_tokens=("<|begin_of_text|>", "<|header_start|>", "<|header_end|>",
                                                  "<|eot|>"))


FORMATS = {f.name: f for f in (LLAMA_GUARD_3, LLAMA_GUARD_4)}
