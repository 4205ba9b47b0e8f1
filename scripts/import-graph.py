#!/usr/bin/env python3
"""Prints the import graph of a crate's source tree and its cycles.

Two levels: rooms (the top-level modules under src/: `crate::server` is the room `server`)
and, inside each room, its files (`super::reply`, `crate::server::reply`). An edge is any
path a file names outside comments, in `use` lines and inline alike; test code (files named
tests.rs, *_tests.rs, testing.rs, and everything after a file's `#[cfg(test)]`) is left
out, as tests may look anywhere. Exit status 1 when there is a cycle.

Usage: scripts/import-graph.py [SRC_DIR ...]   (default: src guest/src)
"""

import re
import sys
from collections import defaultdict
from pathlib import Path

PATH = re.compile(r"\b(crate|super)((?:::[A-Za-z_][A-Za-z0-9_]*)+|::\{[^}]*\})")


def module_of(src: Path, file: Path) -> list[str]:
    parts = list(file.relative_to(src).with_suffix("").parts)
    if parts[-1] in ("mod", "lib", "main"):
        parts.pop()
    return parts


def is_test_file(file: Path) -> bool:
    return file.stem in ("tests", "testing") or file.stem.endswith("_tests")


def code_lines(file: Path):
    for line in file.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#[cfg(test)]"):
            return
        if stripped.startswith("//"):
            continue
        yield line.split("//", 1)[0]


def targets(module: list[str], is_dir_module: bool, line: str):
    """Absolute module paths named on one line."""
    for m in PATH.finditer(line):
        base, rest = m.group(1), m.group(2)
        if rest.startswith("::{"):
            names = [n.strip().split("::")[0] for n in rest[3:-1].split(",")]
        else:
            names = [rest.split("::")[1]]
        # `super` of a file `a/b.rs` is `a`; of `a/b/mod.rs` it is also `a`.
        if base == "crate":
            prefix = []
        else:
            prefix = module[:-1] if not is_dir_module else module[:-1]
        for name in names:
            if name and name not in ("self", "super", "crate"):
                yield prefix + [name]


def graph(src: Path):
    rooms = defaultdict(set)
    files = defaultdict(set)  # (room, file) edges inside one room
    for file in sorted(src.rglob("*.rs")):
        if is_test_file(file):
            continue
        module = module_of(src, file)
        if not module:
            continue
        dir_module = file.name == "mod.rs"
        for line in code_lines(file):
            for target in targets(module, dir_module, line):
                room, to_room = module[0], target[0]
                if to_room != room:
                    if (src / f"{to_room}.rs").exists() or (src / to_room).is_dir():
                        rooms[room].add(to_room)
                elif len(module) > 1 and len(target) > 1:
                    a, b = module[1], target[1]
                    here = src / room
                    known = (here / f"{b}.rs").exists() or (here / b).is_dir()
                    if a != b and known:
                        files[room].add((a, b))
    return rooms, files


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    nodes = set(edges) | {w for ws in edges.values() for w in ws}
    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def main() -> int:
    srcs = [Path(a) for a in sys.argv[1:]] or [Path("src"), Path("guest/src")]
    found = False
    for src in srcs:
        rooms, files = graph(src)
        print(f"== {src}: rooms")
        for room in sorted(rooms):
            print(f"{room} -> {', '.join(sorted(rooms[room]))}")
        for comp in cycles(rooms):
            found = True
            print(f"CYCLE {src} rooms: {' <-> '.join(comp)}")
        for room in sorted(files):
            edges = defaultdict(set)
            for a, b in files[room]:
                edges[a].add(b)
            for comp in cycles(edges):
                found = True
                print(f"CYCLE {src}/{room}: {' <-> '.join(comp)}")
    if not found:
        print("no cycles")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
