"""The fuzz corpus's building blocks: base specs (conftest's tiny ones, completed per flow, and
the example configs), field mutations, and the files no YAML mapping can describe (bombs,
deep nesting, foreign encodings, sweeps). tests/test_fuzz_specs.py runs them."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from conftest import ROOT, tiny_raw
from pai_core import yaml_io
from pai_core.sweep import is_sweep_file

CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if not is_sweep_file(p))  # sweeps: test_sweep


def tiny_base(flow: str = "lottery_ticket") -> dict[str, Any]:
    """conftest's tiny spec, completed for the flows whose sections it does not have."""
    one_shot = {"schedule": "one_shot", "rate": None, "rounds": 1}
    if flow == "dynamic_sparse":
        return tiny_raw(flow, prune={**one_shot, "sparsity": 0.8, "criterion": "random", "scope": "erk"},
                        dynamic={"method": "set", "update_interval": 5})
    if flow == "supermask":
        raw = tiny_raw(flow)
        raw.pop("prune")
        return raw | {"selection": {"method": "edge_popup"}}
    if flow == "early_bird":
        return tiny_raw(flow, prune={**one_shot, "sparsity": 0.5},
                        early_bird={"structure": "unstructured", "window": 2, "epsilon": 0.2})
    if flow == "sanity_checks":
        return tiny_raw(flow, sanity={"base": "lottery_ticket", "checks": ["shuffle"]})
    return tiny_raw(flow)


def base_raw(base: str) -> dict[str, Any]:
    if base == "tiny" or base.startswith("tiny:"):
        return tiny_base(base.partition(":")[2] or "lottery_ticket")
    path = ROOT / base
    return yaml.safe_load(path.read_text()) | {"name": path.stem}


def value(v: Any) -> Any:
    if isinstance(v, dict) and "$times" in v:
        if "$list" in v:
            return [v["$list"]] * v["$times"]
        return v.get("$prefix", "") + v["$repeat"] * v["$times"] + v.get("$postfix", "")
    return v


def mutate(raw: dict[str, Any], sets: dict[Any, Any], unset: list[str] = ()) -> dict[str, Any]:
    raw = yaml_io.plain(raw)
    for path, v in sets.items():
        path = value(path)
        node, parts = raw, path.split(".") if "\n" not in path and len(path) < 200 else [path]
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value(v)
    for path in unset:
        node, parts = raw, path.split(".")
        for part in parts[:-1]:
            node = node[part]
        node.pop(parts[-1], None)
    return raw


# ----------------------------------------------------------------- generated files

def laughs() -> str:
    lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 10)]
    return "\n".join(lines) + "\nflow: lottery_ticket\n"


ONE_SHOT = {"prune": {"schedule": "one_shot", "rate": None, "rounds": 1, "sparsity": 0.5}}


def _sweep(tmp: Path, grid: str, base: str = "spec.yaml") -> bytes:
    (tmp / "spec.yaml").write_text(yaml.safe_dump(tiny_base("prune_at_init") | ONE_SHOT))
    return f"base: [{base}]\ngrid: {grid}\n".encode()


GEN = {
    "deep_flow": lambda tmp: ("flow: lottery_ticket\nname: " + "[" * 30_000 + "]" * 30_000 + "\n").encode(),
    "deep_block": lambda tmp: "".join(" " * i + f"k{i}:\n" for i in range(200)).encode() + b" " * 200 + b"x\n",
    "alias_chain": lambda tmp: ("".join(f"a{i}: &a{i} [{f'*a{i - 1}' if i else 1}]\n" for i in range(40))).encode(),
    "latin1": lambda tmp: b"name: caf\xe9\n" + yaml.safe_dump(tiny_base()).encode(),
    "utf16": lambda tmp: yaml.safe_dump(tiny_base()).encode("utf-16"),
    "utf8_bom": lambda tmp: b"\xef\xbb\xbf" + yaml.safe_dump(tiny_base()).encode(),
    "billion_laughs": lambda tmp: laughs().encode(),
    "huge_file": lambda tmp: yaml.safe_dump(tiny_base()).encode() + b"#" * (70 * 1024) + b"\n",
    "int_5000_digits": lambda tmp: b"seed: " + b"7" * 5000 + b"\n",
    "broken_sweep": lambda tmp: _sweep(tmp, "{seed: [1, 2}"),
    "sweep_bad_point": lambda tmp: _sweep(tmp, "{prune.sparsity: [0.5, 1.5]}").replace(b"[spec.yaml]", b"[one.yaml]"),
    "sweep_huge_grid": lambda tmp: _sweep(tmp, "{seed: [" + ", ".join(map(str, range(100))) + "], "
                                               "prune.rate: [" + ", ".join(["0.1"] * 21) + "]}"),
    "sweep_missing_base": lambda tmp: _sweep(tmp, "{seed: [1]}", base="nope.yaml"),
    "sweep_ok": lambda tmp: _sweep(tmp, "{seed: [0, 1]}"),
    "sweep_grid_scalar": lambda tmp: _sweep(tmp, "{seed: 5}"),
    "sweep_grid_empty": lambda tmp: _sweep(tmp, "{seed: []}"),
    "sweep_grid_unknown": lambda tmp: _sweep(tmp, "{prune.bogus: [1]}"),
    "sweep_grid_empty_key": lambda tmp: _sweep(tmp, "{'prune.': [1]}"),
    "sweep_grid_huge_seed": lambda tmp: _sweep(tmp, "{seed: [1, 1180591620717411303424]}"),
    "sweep_base_empty": lambda tmp: b"base: []\ngrid: {seed: [1]}\n",
    "sweep_base_number": lambda tmp: b"base: [5]\ngrid: {seed: [1]}\n",
    "sweep_inline_bad": lambda tmp: ("base:\n  - " + yaml.safe_dump(
        mutate(tiny_base(), {"train.lr": float("inf")}), default_flow_style=True, width=10**6).strip()
        + "\ngrid: {seed: [1]}\n").encode(),
    "sweep_dask_zero": lambda tmp: _sweep(tmp, "{seed: [1]}") + b"dask: {workers: 0}\n",
    "sweep_name_newline": lambda tmp: _sweep(tmp, "{seed: [1]}") + b'name: "a\\nb"\n',
    "unknown_key_50k": lambda tmp: yaml.safe_dump(tiny_base() | {"k" * 50_000: 1}).encode(),
    "int_key": lambda tmp: yaml.safe_dump(tiny_base() | {1: 2}).encode(),
    "name_binary": lambda tmp: (yaml.safe_dump(tiny_base() | {"name": "x"}) + "name: !!binary aGVsbG8=\n")
    .replace("name: x\n", "").encode(),
    "milestones_12k": lambda tmp: (yaml.safe_dump(tiny_base()).replace("epochs: 2", "epochs: 2\n  milestones: ["
                                   + ", ".join(["1"] * 12_000) + "]")).encode(),
    "duplicate_prune": lambda tmp: (yaml.safe_dump(tiny_base()) + "prune: {rate: 0.5}\n").encode(),
    "merge_keys": lambda tmp: (yaml.safe_dump({k: v for k, v in tiny_base("prune_after_training").items()
                                               if k not in ("train", "retrain")})
                               + "train: &d {optimizer: sgd, lr: 0.05, epochs: 1}\n"
                               "retrain: {<<: *d, lr: 0.01}\n").encode(),
    "anchored_retrain": lambda tmp: (yaml.safe_dump({k: v for k, v in tiny_base("prune_after_training").items()
                                                     if k not in ("train", "retrain")})
                                     + "train: &t {optimizer: sgd, lr: 0.05, epochs: 1}\nretrain: *t\n").encode(),
}


def materialize(case: dict[str, Any], tmp: Path) -> Path:
    path = tmp / "case.yaml"
    if case.get("gen") == "directory":
        path.mkdir()
    elif case.get("gen") == "missing":
        pass
    elif "gen" in case:
        content = GEN[case["gen"]](tmp)
        if case["gen"] == "sweep_bad_point":
            (tmp / "one.yaml").write_text(yaml.safe_dump(tiny_base("prune_at_init") | ONE_SHOT | {"name": "one"}))
        path.write_bytes(content)
    elif "text" in case:
        path.write_bytes(case["text"].encode("utf-8", "surrogatepass"))
    else:
        raw = mutate(base_raw(case["base"]), case.get("set", {}), case.get("unset", []))
        if case.get("expect") == "run":  # 1 epoch, 1 round unless the case says otherwise
            short = {"train.epochs": 1, **({"retrain.epochs": 1} if raw.get("retrain") else {}),
                     **({"prune.rounds": 1} if raw.get("prune", {}).get("rate") else {})}
            raw = mutate(raw, {k: v for k, v in short.items() if k not in case.get("set", {})})
        path.write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False))
    return path


MUTATIONS: dict[str, Any] = {
    "null": None, "text": "abc", "list": [1], "mapping": {"a": 1}, "negative": -1, "zero": 0,
    "2**70": 2**70, "nan": math.nan, "inf": math.inf, "-inf": -math.inf, "half": 0.5, "empty": "",
    "50k-chars": "x" * 50_000, "unicode-lines": "ünï😀\nzwei",
}


def leaves(raw: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in raw.items():
        out.append(prefix + k)
        if isinstance(v, dict) and k != "params":
            out += leaves(v, f"{prefix}{k}.")
    return out


def sections(raw: dict[str, Any], prefix: str = "") -> list[str]:
    return [""] + [s for k, v in raw.items() if isinstance(v, dict) and k != "params"
                   for s in [prefix + k, *[x for x in sections(v, f"{prefix}{k}.") if x]]]


def generated() -> list[tuple[str, str, dict[str, Any], str]]:
    """(id, base, {field: value}, field the refusal must name) per field × mutation; each field is
    mutated in one base that has it, rotating over the bases that do."""
    bases = [f"tiny:{f}" for f in ("lottery_ticket", "prune_after_training", "prune_at_init", "lr_rewinding",
                                    "dynamic_sparse", "supermask", "early_bird", "sanity_checks")]
    bases += [str(p.relative_to(ROOT)) for p in CONFIGS]
    where: dict[str, list[str]] = {}
    for b in bases:
        for field in leaves(base_raw(b)):
            where.setdefault(field, []).append(b)
        for section in sections(base_raw(b)):
            where.setdefault(f"{section}.bogus_field".lstrip("."), []).append(b)
    cases = []
    for n, (field, having) in enumerate(sorted(where.items())):
        if field.endswith("bogus_field"):
            cases.append((f"{field}", having[n % len(having)], {field: 1}, field))
            continue
        for m, (label, v) in enumerate(MUTATIONS.items()):
            cases.append((f"{field}={label}", having[(n + m) % len(having)], {field: v}, field))
    return cases
