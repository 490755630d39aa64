"""An offline machine: the hub probe, cached hub ids loading at once, clear errors without retries."""

import os
import shutil
import socket
import subprocess
import sys

import pytest

from rematch_pl import hub

PROXIES = hub.PROXY_ENVS + ("HF_HUB_OFFLINE", hub.PROBE_ENV)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once it is closed


@pytest.fixture
def probe(monkeypatch):
    for k in PROXIES:
        monkeypatch.delenv(k, raising=False)
    hub.hub_reachable.cache_clear()
    yield monkeypatch
    hub.hub_reachable.cache_clear()


def test_probe_sees_a_listening_endpoint_and_a_closed_one(probe):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        probe.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub.hub_reachable()
    hub.hub_reachable.cache_clear()
    probe.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    assert not hub.hub_reachable()
    assert hub.hub_kwargs("org/model", "v1") == {"revision": "v1", "local_files_only": True}
    assert hub.hub_kwargs("./a/folder") == {}  # a path written as a folder is never a hub id


@pytest.mark.parametrize("env", [{"HTTPS_PROXY": "http://proxy:3128"}, {hub.PROBE_ENV: "0"}])
def test_no_probe_behind_a_proxy_or_when_switched_off(probe, env):
    probe.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    for k, v in env.items():
        probe.setenv(k, v)
    assert hub.hub_reachable()  # the network is tried as before
    assert hub.hub_kwargs("org/model") == {}


def test_hf_hub_offline_means_offline_without_a_probe(probe):
    probe.setenv("HF_HUB_OFFLINE", "1")
    assert not hub.hub_reachable()


def _offline_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in PROXIES}
    env.update(HF_HUB_CACHE=str(tmp_path / "hub"), HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}")
    return env


def _run(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)


def test_cached_hub_id_loads_at_once_without_network(tmp_path, tiny_paths):
    """A compute node without network, the model in its Hugging Face cache, no HF_HUB_OFFLINE:
    the backbone loads from the cache and the hub client never retries a request."""
    repo = tmp_path / "hub" / "models--rematch--tiny-qwen2vl"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_paths["qwen2vl"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    res = _run("from rematch_pl.backbone.model import load_backbone\n"
               "b = load_backbone('rematch/tiny-qwen2vl', lora={'enabled': True, 'r': 4, 'alpha': 8})\n"
               "print('loaded', b.hidden_size, b.processor.image_token_id)", _offline_env(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("loaded"), res.stdout
    assert "cannot be reached" in res.stderr  # the probe says what it decided
    assert "Retrying" not in res.stderr, res.stderr[-3000:]


def test_uncached_hub_id_fails_at_once_naming_the_setting(tmp_path):
    res = _run("from rematch_pl.backbone.model import load_backbone\nload_backbone('rematch/not-cached')",
               _offline_env(tmp_path))
    assert res.returncode != 0
    assert "backbone.path='rematch/not-cached' could not be loaded" in res.stderr
    assert "not in the local Hugging Face cache" in res.stderr and "cannot be reached" in res.stderr
    assert "Retrying" not in res.stderr, res.stderr[-3000:]


def test_hub_dataset_fails_at_once_when_the_hub_cannot_be_reached(tmp_path):
    res = _run("from rematch_pl.data.mmeb import list_subsets, stream_subset, DataError\n"
               "for f in (lambda: list_subsets('TIGER-Lab/MMEB-train'),\n"
               "          lambda: stream_subset('TIGER-Lab/MMEB-train', 'ChartQA', 'original')):\n"
               "    try:\n"
               "        f()\n"
               "    except DataError as e:\n"
               "        print('DataError:', e)\n", _offline_env(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    errors = [line for line in res.stdout.splitlines() if line.startswith("DataError:")]
    assert len(errors) == 2, res.stdout
    for e in errors:
        assert "TIGER-Lab/MMEB-train" in e and "cannot be reached" in e and "hf download" in e
    assert "Retrying" not in res.stderr, res.stderr[-3000:]
