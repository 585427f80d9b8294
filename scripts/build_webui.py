#!/usr/bin/env python3
"""Copy the web chat page's front-end libraries from npm into src/llamaforge/server/static/vendor/.

    python scripts/build_webui.py            # npm ci (webui/package-lock.json) in a temp dir, copy, write VENDOR.json
    python scripts/build_webui.py --check    # offline: the committed files match VENDOR.json (no npm)

Run by `make webui` only: the copies are committed with their licence texts, so installing, testing and serving
llamaforge never needs npm or a network. Versions are pinned in webui/package.json and, with integrity hashes,
in webui/package-lock.json; bump them there and rerun.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "webui"
VENDOR = ROOT / "src" / "llamaforge" / "server" / "static" / "vendor"

# package -> (files copied: node_modules path -> vendor name, licence files, what the page uses it for)
PACKAGES = {
    "marked": ({"lib/marked.esm.js": "marked.esm.js"}, ["LICENSE"], "Markdown to HTML"),
    # DOMPurify is dual-licensed (Apache-2.0 or MPL-2.0); we ship both texts and use it under Apache-2.0.
    "dompurify": ({"dist/purify.es.mjs": "purify.es.mjs"}, ["LICENSE", "LICENSE-MPL"], "HTML sanitizer"),
    "@highlightjs/cdn-assets": ({"es/highlight.min.js": "highlight.min.js"}, ["LICENSE"],
                                "code highlighting (its common-languages build)"),
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build() -> int:
    if shutil.which("npm") is None:
        print("build_webui: npm is not installed (apt-get install npm)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="lf-webui-") as tmp:
        work = Path(tmp)
        for name in ("package.json", "package-lock.json"):
            shutil.copy2(SOURCE / name, work / name)
        # --ignore-scripts: nothing from the registry runs here; we only copy files.
        subprocess.run(["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
                       cwd=work, check=True, timeout=600)
        if VENDOR.exists():
            shutil.rmtree(VENDOR)
        (VENDOR / "licenses").mkdir(parents=True)
        manifest = {"generated_by": "scripts/build_webui.py", "packages": []}
        for pkg, (files, licences, purpose) in PACKAGES.items():
            base = work / "node_modules" / pkg
            meta = json.loads((base / "package.json").read_text())
            entry = {"name": pkg, "version": meta["version"], "license": meta.get("license"), "purpose": purpose,
                     "files": {}, "license_files": []}
            for src, dst in files.items():
                shutil.copy2(base / src, VENDOR / dst)
                entry["files"][dst] = {"from": f"{pkg}/{src}", "sha256": sha256(VENDOR / dst)}
            for lic in licences:
                dst = f"licenses/{pkg.lstrip('@').replace('/', '-')}-{lic}.txt"
                shutil.copy2(base / lic, VENDOR / dst)
                entry["license_files"].append(dst)
            manifest["packages"].append(entry)
        (VENDOR / "VENDOR.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"build_webui: wrote {VENDOR.relative_to(ROOT)} "
          + ", ".join(f"{p['name']} {p['version']}" for p in manifest["packages"]))
    return 0


def check() -> list[str]:
    """Problems with the committed vendor files (missing, changed, licence text absent); empty when all good."""
    problems = []
    manifest_path = VENDOR / "VENDOR.json"
    if not manifest_path.is_file():
        return [f"{manifest_path} is missing (run make webui)"]
    manifest = json.loads(manifest_path.read_text())
    for p in manifest["packages"]:
        for name, info in p["files"].items():
            f = VENDOR / name
            if not f.is_file():
                problems.append(f"{name} ({p['name']}) is missing")
            elif sha256(f) != info["sha256"]:
                problems.append(f"{name} ({p['name']}) differs from the copy recorded in VENDOR.json")
        for lic in p["license_files"]:
            if not (VENDOR / lic).is_file() or not (VENDOR / lic).read_text().strip():
                problems.append(f"licence file {lic} of {p['name']} is missing or empty")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="verify the committed copies, without npm")
    args = ap.parse_args(argv)
    if args.check:
        problems = check()
        for line in problems:
            print("build_webui:", line, file=sys.stderr)
        return 1 if problems else 0
    return build()


if __name__ == "__main__":
    sys.exit(main())
