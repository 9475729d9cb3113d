"""Print the requirements pyproject.toml declares for the base install plus some extras.

The image installs these in a layer of their own before it copies the source, so editing
the code (or any part of pyproject.toml but the dependencies) does not reinstall them:
    python3 docker/requirements.py pyproject.toml flower,torch > requirements.txt
"""

import sys
import tomllib


def requirements(pyproject: str, extras: str) -> list[str]:
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    optional = project.get("optional-dependencies", {})
    wanted = [e.strip() for e in extras.split(",") if e.strip()]
    unknown = sorted(set(wanted) - set(optional))
    if unknown:
        raise SystemExit(f"unknown extras {unknown}; pyproject.toml has {sorted(optional)}")
    reqs = list(project.get("dependencies", []))
    for extra in dict.fromkeys(wanted):
        reqs += [r for r in optional[extra] if r not in reqs]
    return reqs


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "")))
