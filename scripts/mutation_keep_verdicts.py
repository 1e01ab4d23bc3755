"""Put back the verdicts a `mutmut run <names>` forgot: the survivors-only rerun of
scripts/mutation.sh leaves every mutant it did not run as "not checked", so the report would
score the module on the rerun alone.

    python scripts/mutation_keep_verdicts.py save DIR      copy mutants/**/*.meta to DIR
    python scripts/mutation_keep_verdicts.py restore DIR   verdicts from DIR for mutants not rerun

A saved verdict comes back only for a mutant whose function is unchanged since it was given
(mutmut's hash of the function's source), so an edit of the code never inherits an old verdict.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

MUTANTS = Path("mutants")


def save(folder: Path) -> int:
    for meta in MUTANTS.rglob("*.meta"):
        target = folder / meta.relative_to(MUTANTS)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(meta, target)
    return 0


def function_of(key: str) -> str:
    """`pool.poller.xǁPollerǁrun__mutmut_3` -> `xǁPollerǁrun`, as mutmut keys its hashes."""
    return key.rsplit("__mutmut_", 1)[0].rsplit(".", 1)[-1]


def restore(folder: Path) -> int:
    kept = 0
    for saved in folder.rglob("*.meta"):
        current_path = MUTANTS / saved.relative_to(folder)
        if not current_path.exists():
            continue
        old, new = json.loads(saved.read_text()), json.loads(current_path.read_text())
        old_hashes, new_hashes = old.get("hash_by_function_name", {}), new.get("hash_by_function_name", {})
        for key, verdict in old.get("exit_code_by_key", {}).items():
            function = function_of(key)
            same_code = function in old_hashes and old_hashes.get(function) == new_hashes.get(function)
            if verdict is not None and same_code and new["exit_code_by_key"].get(key, 0) is None:
                new["exit_code_by_key"][key] = verdict
                if key in old.get("durations_by_key", {}):
                    new.setdefault("durations_by_key", {})[key] = old["durations_by_key"][key]
                kept += 1
        current_path.write_text(json.dumps(new, indent=4))
    print(f"mutation_keep_verdicts: {kept} verdicts of mutants not rerun kept from the last run")
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("save", "restore"):
        print(__doc__, file=sys.stderr)
        return 2
    folder = Path(argv[1])
    return save(folder) if argv[0] == "save" else restore(folder)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
