"""Security: no pickle from user paths, remote code only with an explicit flag, no network unless asked.

The source checks read the package's syntax trees (not its text), so a comment or a docstring that
mentions `torch.load` does not count, and an aliased call does.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest

from nexus.base.loader import check_model_path
from nexus.cli import build_parser, main
from nexus.errors import NexusError
from tiny import save_model_dir, write_text_dataset

SRC = Path(__file__).resolve().parents[1] / "src" / "nexus"
UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _calls(tree: ast.AST):
    """(call, name): `f` for f(...), `x.f` for x.f(...), `.f` for any longer chain (a.b.f(...))."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name):
                yield node, f.id
            elif isinstance(f, ast.Attribute):
                yield node, f"{f.value.id}.{f.attr}" if isinstance(f.value, ast.Name) else f".{f.attr}"


def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _sources():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 30
    return [(f.relative_to(SRC.parent), ast.parse(f.read_text(), str(f))) for f in files]


def test_no_unpickling_anywhere_but_torch_load_with_weights_only():
    problems = []
    for path, tree in _sources():
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            problems += [f"{path}:{node.lineno}: imports {n}" for n in names if n.split(".")[0] in UNPICKLERS]
        for call, name in _calls(tree):
            where = f"{path}:{call.lineno}: {name}("
            weights_only = _kw(call, "weights_only")
            if name == "torch.load" or weights_only is not None:
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    problems.append(where + " without weights_only=True")
            allow_pickle = _kw(call, "allow_pickle")
            if isinstance(allow_pickle, ast.Constant) and allow_pickle.value:
                problems.append(where + " with allow_pickle=True")
            if name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "pd.read_pickle", "eval", "exec"):
                problems.append(where + ")")
    assert problems == []


def test_torch_load_is_used_only_for_nexus_own_optimizer_and_rng_state():
    users = [str(path) for path, tree in _sources() for _, name in _calls(tree) if name == "torch.load"]
    assert users == ["nexus/train/checkpoint.py"]


def test_trust_remote_code_is_never_hard_coded_on():
    problems = []
    for path, tree in _sources():
        for call, name in _calls(tree):
            value = _kw(call, "trust_remote_code")
            if isinstance(value, ast.Constant) and value.value is not False:
                problems.append(f"{path}:{call.lineno}: {name}(trust_remote_code={value.value!r})")
    assert problems == []


def test_every_trust_remote_code_flag_is_off_by_default():
    parser = build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    flags = {verb: action.default for verb, sub in verbs.items() for action in sub._actions
             if action.dest == "trust_remote_code"}
    assert flags and all(default is False for default in flags.values()), flags


def test_remote_code_in_a_model_directory_is_not_run_without_the_flag(tmp_path, capsys):
    model = tmp_path / "custom"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "acme_moe", "auto_map": {"AutoConfig": "conf.AcmeConfig", '
                                       '"AutoModelForCausalLM": "modeling.AcmeForCausalLM"}}')
    for name in ("conf.py", "modeling.py"):
        (model / name).write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('remote code ran')\n")
    for argv in (["plan", "--model", model], ["collect", "--model", model, "--dataset", model / "config.json"],
                 ["chat", "--model", model, "--prompt", "hi"], ["convert", "--input", model, "--output",
                                                                 tmp_path / "a", "--init-strategy", "zero"]):
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in argv])
        assert e.value.code == 2 and "asks for custom modeling code" in capsys.readouterr().err
    assert not (tmp_path / "ran").exists()


# ----------------------------------------------------------------------------------------------- network


def test_local_paths_open_no_network_connection_even_online(model_and_data, tmp_path, monkeypatch, capsys):
    """With hub access allowed (offline mode off), verbs on local paths connect to nothing."""
    import socket

    import huggingface_hub.constants

    model, data = model_and_data
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    attempts = []

    def connect(sock, address):
        attempts.append(address)
        raise OSError("network refused by the test")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: connect(None, address))
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: connect(None, host))
    for argv in (["plan", "--model", model], ["sample", "--dataset", data, "--tokenizer", model, "--output",
                                               tmp_path / "s.jsonl", "--target-tokens", 50, "--seq-len", 16]):
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in argv])
        assert e.value.code == 0, capsys.readouterr().err[-2000:]
    assert attempts == []
    from nexus.data import load_tokenizer

    with pytest.raises(NexusError, match="org/name: cannot load a tokenizer"):
        load_tokenizer("org/name")  # a hub name is asked of the hub (the guard sees it), not refused locally
    assert attempts


@pytest.fixture
def hub_calls(monkeypatch):
    """Every request transformers makes to the hub (or its cache of the hub), recorded and refused."""
    import huggingface_hub
    import transformers.utils.hub as tf_hub

    calls = []

    def refuse(*args, **kwargs):
        calls.append(args[:2])
        raise OSError("hub access refused by the test")

    for module in (tf_hub, huggingface_hub):
        for name in ("hf_hub_download", "snapshot_download"):
            monkeypatch.setattr(module, name, refuse)
    return calls


def test_local_path_rules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert check_model_path("openai/gpt-oss-20b") == "openai/gpt-oss-20b"  # a hub name, as the user asked
    for local in ("runs/adapter", "./org/name", "../org/name", "~/org/name", "a/b/c", "adapter", str(tmp_path / "x")):
        with pytest.raises(NexusError, match="no such directory"):
            check_model_path(local)


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("net")
    return save_model_dir(root / "model"), write_text_dataset(root / "data.jsonl", n=8)


@pytest.mark.parametrize("verb", ["sample", "collect", "convert", "precompute-teacher", "train", "train-teacher",
                                  "validate", "validate-baseline", "chat", "analyze", "plan"])
def test_a_missing_local_path_never_reaches_the_hub(verb, hub_calls, model_and_data, tmp_path, monkeypatch, capsys):
    model, data = model_and_data
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    missing = "runs/adapter"  # shaped like a hub name, but `runs/` is a local folder: a typo, not a request
    argv = {
        "sample": ["sample", "--dataset", data, "--tokenizer", missing],
        "collect": ["collect", "--model", missing, "--dataset", data, "--device", "cpu"],
        "convert": ["convert", "--input", missing, "--output", "out", "--init-strategy", "zero"],
        "precompute-teacher": ["precompute-teacher", "--model", missing, "--dataset", data, "--output", "c",
                               "--num-sequences", 1, "--device", "cpu"],
        "train": ["train", "--student-model", missing, "--dataset", data, "--output-dir", "t", "--device", "cpu"],
        "train-teacher": ["train", "--student-model", model, "--init-strategy", "random", "--dataset", data,
                          "--seq-len", 16, "--output-dir", "t", "--device", "cpu", "--teacher-model", missing],
        "validate": ["validate", "--model", missing, "--dataset", data, "--device", "cpu"],
        "validate-baseline": ["validate", "--model", model, "--baseline", missing, "--dataset", data, "--seq-len", 16,
                              "--device", "cpu"],
        "chat": ["chat", "--model", missing, "--prompt", "hi", "--device", "cpu"],
        "analyze": ["analyze", "--input", "stats.safetensors", "--model", missing],
        "plan": ["plan", "--model", missing],
    }[verb]
    if verb == "analyze":
        from nexus.stats.accumulate import RouterStats

        stats = RouterStats([0, 1], 8, 2, "qwen3_moe")
        stats.sums[0]["count"] += 1
        stats.sums[1]["count"] += 1
        stats.save("stats.safetensors")
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "runs/adapter: no such" in err, err[-2000:]
    assert hub_calls == []
