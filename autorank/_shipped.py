"""The data files autorank ships: its search spaces and the tracking server's config.

The top-level `search_spaces/` and `mlflow_server/server.yaml` of the source tree are the source of
truth; building the wheel maps them into the package (`autorank/search_spaces/`,
`autorank/mlflow_server/`: pyproject.toml's package-dir). An installed autorank reads them there,
a source checkout (editable install, tests) reads the top-level folders themselves.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def _folder(name: str) -> Path:
    inside = _PACKAGE / name
    return inside if inside.is_dir() else _PACKAGE.parent / name


def search_spaces() -> dict[str, Path]:
    """Shipped search spaces by name (the file's stem: `default`, `resnet_cifar`, ...), sorted."""
    return {path.stem: path for path in sorted(_folder("search_spaces").glob("*.yaml"))}


def server_config() -> Path:
    """The shipped tracking-server config (`autorank server`'s default settings)."""
    return _folder("mlflow_server") / "server.yaml"
