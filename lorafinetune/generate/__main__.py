"""python -m lorafinetune.generate [--write | --check]: see the package's docstring."""

from __future__ import annotations

import argparse
import sys

from lorafinetune import generate


def main(argv: list[str] | None = None) -> int:
    summary = (generate.__doc__ or "").split("\n")[0]
    parser = argparse.ArgumentParser(prog="python -m lorafinetune.generate", description=summary)
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help="write every generated file")
    action.add_argument("--check", action="store_true", help="exit 1 and name the files that differ")
    args = parser.parse_args(argv)
    files = generate.generated_files()
    if args.write:
        for path, text in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        return 0
    stale = [path for path, text in files.items() if not path.exists() or path.read_text() != text]
    for path in stale:
        shown = path.relative_to(generate.REPO) if path.is_relative_to(generate.REPO) else path
        print(f"stale: {shown} (run make generate)", file=sys.stderr)
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
