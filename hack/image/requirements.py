"""Print the project's pinned requirements for an image, one a line, from pyproject.toml.

    python3 requirements.py pyproject.toml train operator    # [project] dependencies + those extras
    python3 requirements.py pyproject.toml --build           # [build-system] requires

Run inside the image build (Dockerfile), so pyproject.toml stays the only list of pins. Only the printed text
enters the build's cache key: editing pyproject.toml without changing a pin reinstalls nothing.
"""

import sys
import tomllib

path, *extras = sys.argv[1:]
with open(path, "rb") as f:
    pyproject = tomllib.load(f)
if extras == ["--build"]:
    requirements = list(pyproject["build-system"]["requires"])
else:
    project = pyproject["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
print("\n".join(requirements))
