"""Safety: guard classifiers (Llama Guard 3/4 models or the built-in guard), a Code Shield-style code scanner,
a prompt-injection filter, and the seam stages that apply them to every request (`safety.stages`).

    from llamaforge.safety import load_guard, scan_code
    load_guard().check("How do I kill a stuck process?")      # Verdict(safe=True, categories=[], score=...)
    scan_code("os.system('rm ' + p)", "python").verdict       # "block"
"""
from __future__ import annotations

from .classifier import Guard, GuardError, Verdict
from .code_scan import ScanResult, extract_code_blocks, scan_answer, scan_code
from .guards import load_guard
from .injection import InjectionFilter

__all__ = ["Guard", "GuardError", "Verdict", "load_guard", "scan_code", "scan_answer", "extract_code_blocks",
           "ScanResult", "InjectionFilter"]
