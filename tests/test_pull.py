"""`pull`, `list`, `show`, `rm` and `run NAME` against a Hugging Face Hub served on 127.0.0.1."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import save_file

from conftest import SPM_V3, add_spm_vocab, hf_to_interleaved, make_hf_model, progress_bars, write_gguf
from hub import Hub
from lilmistral.cli import main
from lilmistral.registry import resolve
from lilmistral.store import Store

REGISTRY = """
[tiny]
default = "latest"
description = "a tiny random Mistral"
license = "apache-2.0"
sampling = { temperature = 0.3, top_k = 20 }

[tiny.tags.latest]
repo = "test/tiny-mistral"
files = ["config.json", "params.json", "model-*.safetensors", "model.safetensors.index.json",
         "consolidated.safetensors", "tokenizer.model.v3"]
quant = "int8"
num_ctx = 4096
sampling = { top_k = 10 }

[tinymix]
default = "latest"
[tinymix.tags.latest]
repo = "test/tiny-mixtral"
files = ["config.json", "model-*.safetensors", "model.safetensors.index.json", "tokenizer.model.v3"]
quant = "int4"

[tinygguf]
default = "latest"
[tinygguf.tags.latest]
repo = "test/tiny-GGUF"
gguf = "Q8_0"

[gated]
default = "latest"
[gated.tags.latest]
repo = "mistralai/gated-tiny"
files = ["config.json", "model-*.safetensors", "model.safetensors.index.json", "tokenizer.model.v3"]
quant = "int8"
"""


def publish(folder: Path, ref_model, consolidated: bool) -> Path:
    """Lay a tiny model out like a Mistral repo: sharded model-*.safetensors + index, and optionally the
    same weights again as consolidated.safetensors with params.json."""
    ref_model.save_pretrained(folder, max_shard_size="6MB")
    (folder / "tokenizer.model.v3").write_bytes(SPM_V3.read_bytes())
    if consolidated:
        import lilmistral

        llm = lilmistral.load(folder)
        state = {}
        for name, t in llm.model.state_dict().items():
            if name.endswith("attention.wq.weight"):
                t = hf_to_interleaved(t, llm.args.n_heads)
            elif name.endswith("attention.wk.weight"):
                t = hf_to_interleaved(t, llm.args.n_kv_heads)
            state[name] = t.contiguous()
        save_file(state, folder / "consolidated.safetensors")
        a = llm.args
        (folder / "params.json").write_text(json.dumps(dict(
            dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads, hidden_dim=a.hidden_dim,
            vocab_size=a.vocab_size, norm_eps=a.norm_eps, rope_theta=a.rope_theta, sliding_window=a.sliding_window)))
    return folder


def publish_gguf(folder: Path, source: Path) -> Path:
    """A GGUF repo as llama.cpp's users publish them: one file per type, Q8_0 split in parts (gguf-split's), and
    an F16 one, whose type is also a lilmistral scheme."""
    import lilmistral

    folder.mkdir()
    llm = lilmistral.load(source, quant="f32")
    write_gguf(folder / "tiny-mistral.Q4_0.gguf", llm.model.state_dict(), llm.args, qtype="Q4_0",
               vocab=lambda w: (add_spm_vocab(w), w.add_float32("general.sampling.top_p", 0.5)))  # its own top_p
    write_gguf(folder / "tiny-mistral.Q8_0.gguf", llm.model.state_dict(), llm.args, qtype="Q8_0", split_tensors=20)
    write_gguf(folder / "tiny-mistral.F16.gguf", llm.model.state_dict(), llm.args, qtype="F16")
    (folder / "README.md").write_text("# tiny-mistral GGUF\n")
    return folder


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("repos")
    hub = Hub()
    made = root / "made"
    m = make_hf_model(made / "mistral", "mistral", sliding_window=8)
    hub.add_repo("test/tiny-mistral", publish(root / "tiny-mistral", m, consolidated=True))
    x = make_hf_model(made / "mixtral", "mixtral", num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
    hub.add_repo("test/tiny-mixtral", publish(root / "tiny-mixtral", x, consolidated=False))
    hub.add_repo("mistralai/gated-tiny", publish(root / "gated", m, consolidated=False), gated=True)
    hub.add_repo("test/tiny-GGUF", publish_gguf(root / "tiny-gguf", root / "tiny-mistral"))
    yield hub
    hub.close()


@pytest.fixture
def home(tmp_path, hub):
    home = tmp_path / "home"
    home.mkdir()
    (home / "models.toml").write_text(REGISTRY)
    hub.requests.clear()
    return home


def env_for(home: Path, hub: Hub, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(LILMISTRAL_HOME=str(home), HF_ENDPOINT=hub.url, HF_HOME=str(home / "hf-home"), **extra)
    return env


def cli(home: Path, hub: Hub, *args: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lilmistral", *args], capture_output=True, text=True,
                          timeout=300, env=env_for(home, hub, **extra))


def test_pull_then_run_then_pull_again(home, hub):
    stale = home / "downloads" / "tiny" / "latest" / ("0" * 40)  # an earlier revision's download, left half done
    stale.mkdir(parents=True)
    (stale / "model-00001-of-00003.safetensors.partial").write_bytes(b"\0" * 1000)
    r = cli(home, hub, "pull", "tiny")
    assert r.returncode == 0, r.stderr
    fetched = {p.rsplit("/", 1)[1] for _, p, _ in hub.requests if "/resolve/" in p}
    assert "consolidated.safetensors" not in fetched  # the repo has the weights twice: one set only
    assert any(f.startswith("model-000") for f in fetched) and "tokenizer.model.v3" in fetched
    assert not [p for p in (home / "downloads").rglob("*") if p.is_file()]  # the download, and the stale one, gone
    r = cli(home, hub, "list")
    assert r.returncode == 0 and "tiny:latest" in r.stdout and "int8" in r.stdout
    r = cli(home, hub, "show", "tiny")
    assert r.returncode == 0
    for words in ("MistralForCausalLM", "sliding window 8", "int8", "test/tiny-mistral", "apache-2.0", "mistral_common",
                  "temperature 0.3 (the model's), top_k 10 (the model's), top_p 0.9,"):  # the registry's, a tag's over
        assert words in r.stdout, r.stdout
    r = cli(home, hub, "run", "tiny", "Hello", "--temperature", "0", "--max-tokens", "5")
    assert r.returncode == 0, r.stderr
    hub.requests.clear()
    r = cli(home, hub, "pull", "tiny")
    assert r.returncode == 0 and "up to date" in r.stderr
    assert not any("/resolve/" in p for _, p, _ in hub.requests)  # nothing downloaded again
    r = cli(home, hub, "pull", "tiny", "--force", "--keep-source")
    assert r.returncode == 0, r.stderr
    [kept] = (home / "downloads" / "tiny" / "latest").iterdir()
    assert shard_names(hub, "test/tiny-mistral") == sorted(p.name for p in kept.glob("model-*"))


def test_a_pull_at_a_terminal_shows_a_bar_for_each_file_and_for_the_conversion(home, hub):
    """The conversion (minutes for a 7B model) had no bar: the downloads' stood finished meanwhile."""
    bars, shown = progress_bars("pull", "tiny", env=env_for(home, hub))
    assert {"config.json", "tokenizer.model.v3", "converting to int8"} <= bars.keys(), bars
    assert all(done > 0 for done in bars.values()) and "tiny:latest ready" in shown, bars


def test_pull_a_gguf_file_by_its_type(home, hub, tmp_path):
    r = cli(home, hub, "pull", "hf.co/test/tiny-GGUF:Q4_0")  # as Ollama names it
    assert r.returncode == 0, r.stderr
    assert {p.rsplit("/", 1)[1] for _, p, _ in hub.requests if "/resolve/" in p} == {"tiny-mistral.Q4_0.gguf"}
    r = cli(home, hub, "list")
    assert r.returncode == 0 and "test--tiny-GGUF:q4_0" in r.stdout and "int4" in r.stdout, r.stdout
    manifest = json.loads((home / "models" / "test--tiny-GGUF" / "q4_0" / "manifest.json").read_text())
    assert manifest["sampling"] == {"top_p": 0.5}  # the file's, kept through the conversion
    r = cli(home, hub, "show", "test/tiny-GGUF:q4_0")
    assert r.returncode == 0 and "test/tiny-GGUF" in r.stdout, r.stdout + r.stderr
    local = tmp_path / "tiny-mistral.Q4_0.gguf"
    local.write_bytes(hub.repos["test/tiny-GGUF"]["files"][local.name])
    ask = ("Hello", "--temperature", "0", "--max-tokens", "6")
    pulled, direct = cli(home, hub, "run", "test/tiny-GGUF:q4_0", *ask), cli(home, hub, "run", str(local), *ask)
    assert pulled.returncode == direct.returncode == 0, pulled.stderr + direct.stderr
    assert pulled.stdout == direct.stdout and pulled.stdout.strip()
    hub.requests.clear()
    r = cli(home, hub, "pull", "tinygguf")  # a registry tag naming a GGUF type, here split in parts
    assert r.returncode == 0, r.stderr
    parts = {n for n in hub.repos["test/tiny-GGUF"]["files"] if n.startswith("tiny-mistral.Q8_0-")}
    assert len(parts) > 1 and {p.rsplit("/", 1)[1] for _, p, _ in hub.requests if "/resolve/" in p} == parts
    assert ["tinygguf:latest", "int8"] in [line.split()[:2] for line in cli(home, hub, "list").stdout.splitlines()]
    hub.requests.clear()
    r = cli(home, hub, "pull", "test/tiny-GGUF:F16")  # a scheme's name: a GGUF repo's file of that type, kept f16
    assert r.returncode == 0, r.stderr
    assert {p.rsplit("/", 1)[1] for _, p, _ in hub.requests if "/resolve/" in p} == {"tiny-mistral.F16.gguf"}
    assert ["test--tiny-GGUF:f16", "f16"] in [line.split()[:2] for line in cli(home, hub, "list").stdout.splitlines()]
    assert cli(home, hub, "rm", "hf.co/test/tiny-GGUF:Q4_0", "test/tiny-GGUF:f16").returncode == 0
    assert "test--tiny-GGUF" not in cli(home, hub, "list").stdout
    # a type the repo lacks, no type, and a GGUF type of a safetensors repo: one line each
    for ref, words in (("test/tiny-GGUF:Q5_K_M", "its types: F16, Q4_0, Q8_0"),
                       ("test/tiny-GGUF", "pull test/tiny-GGUF:Q4_0 (types: F16, Q4_0, Q8_0)"),
                       ("test/tiny-mistral:Q4_K_M", "has no GGUF files: pull test/tiny-mistral:int4")):
        r = cli(home, hub, "pull", ref)
        error = r.stderr.splitlines()[-1]
        assert r.returncode == 1 and error.startswith("Error: ") and words in error, (ref, r.stderr)
        assert "Traceback" not in r.stderr
    assert not list((home / "models").glob("*/q5_k_m"))


def test_run_pulls_first_and_rm_frees_space(home, hub):
    r = cli(home, hub, "run", "tinymix", "Hello", "--temperature", "0", "--max-tokens", "4")
    assert r.returncode == 0, r.stderr
    model = home / "models" / "tinymix" / "latest"
    assert (model / "manifest.json").is_file()
    # rm and list, as the command runs them, start in a fraction of a second: without importing torch
    light = ("import sys; from lilmistral.cli import main; codes = [main(['rm', 'tinymix']), main(['list'])]; "
             "assert codes == [0, 0] and 'torch' not in sys.modules, (codes, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", light], capture_output=True, text=True, timeout=60,
                       env=env_for(home, hub))
    assert r.returncode == 0, r.stderr
    removed, listed = r.stdout.split("freed")
    assert not model.exists() and "tinymix" in removed and "tinymix" not in listed


def test_rm_refuses_a_model_being_pulled(home, hub):
    assert cli(home, hub, "pull", "tiny").returncode == 0
    store = Store(home)
    with store.pull_lock(resolve("tiny", home), on_wait=lambda: None):  # as a pull in progress holds it
        r = cli(home, hub, "rm", "tiny")
    assert r.returncode == 1 and r.stderr == "Error: tiny:latest is being pulled; stop that pull first\n"
    assert store.installed(resolve("tiny", home)) is not None
    assert cli(home, hub, "rm", "tiny").returncode == 0


def test_rm_deletes_an_interrupted_pulls_download(home, hub, monkeypatch, capsys):
    """It said "not pulled" and kept the download (a 7B model's is ~14 GB); and `rm` of a model never pulled
    made an empty lock file in the store."""
    monkeypatch.setenv("LILMISTRAL_HOME", str(home))
    download = home / "downloads" / "tiny" / "latest" / ("0" * 40)
    download.mkdir(parents=True)
    (download / "model-00001-of-00003.safetensors.partial").write_bytes(b"\0" * 3000)
    assert main(["rm", "tiny"]) == 0
    assert "deleted tiny:latest (3.0 KB freed)" in capsys.readouterr().out
    assert not (home / "downloads" / "tiny").exists()
    assert main(["rm", "tinymix"]) == 1
    assert capsys.readouterr().err == "Error: tinymix:latest is not pulled\n"
    assert not (home / "locks" / "tinymix@latest.lock").exists()


def shard_names(hub: Hub, repo: str) -> list[str]:
    return sorted(n for n in hub.repos[repo]["files"] if n.startswith("model-"))


def test_cut_connection_resumes_with_a_range(home, hub):
    shard = shard_names(hub, "test/tiny-mistral")[0]
    size = len(hub.repos["test/tiny-mistral"]["files"][shard])
    hub.cut_after[shard] = size // 3
    r = cli(home, hub, "pull", "tiny")
    assert r.returncode == 0, r.stderr
    ranges = [rng for _, _, rng in hub.file_requests(shard)]
    assert ranges[0] is None and len(ranges) == 2
    resumed_at = int(ranges[1].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= size // 3  # continues from the bytes that reached the disk


def test_sigint_then_pull_again_resumes(home, hub):
    files = hub.repos["test/tiny-mistral"]["files"]
    shard = max(shard_names(hub, "test/tiny-mistral"), key=lambda n: len(files[n]))
    hub.slow[shard] = 0.05  # about 1.3 MB/s
    proc = subprocess.Popen([sys.executable, "-m", "lilmistral", "pull", "tiny"], env=env_for(home, hub),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial = None
    deadline = time.time() + 60
    while time.time() < deadline:
        found = list(home.glob(f"downloads/**/{shard}.partial"))
        if found and found[0].stat().st_size > len(files[shard]) // 4:
            partial = found[0]
            break
        time.sleep(0.05)
    assert partial is not None, "the download never started"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    hub.slow.clear()
    assert proc.returncode != 0
    have = partial.stat().st_size
    assert have > 0
    r = cli(home, hub, "list")  # the store reads cleanly: no half model
    assert r.returncode == 0 and "tiny" not in r.stdout
    r = cli(home, hub, "pull", "tiny")
    assert r.returncode == 0, r.stderr
    assert hub.file_requests(shard)[-1][2] == f"bytes={have}-"
    assert "tiny:latest" in cli(home, hub, "list").stdout


def test_two_pulls_at_once_download_once(home, hub):
    """A second `pull` (or `run` pulling) of a model being pulled waits for the first, which would otherwise
    find its FILE.partial appended to by both, and then finds the model there."""
    files = hub.repos["test/tiny-mistral"]["files"]
    shard = max(shard_names(hub, "test/tiny-mistral"), key=lambda n: len(files[n]))
    hub.slow[shard] = 0.02  # about 3 MB/s
    first = subprocess.Popen([sys.executable, "-m", "lilmistral", "pull", "tiny"], env=env_for(home, hub),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list(home.glob(f"downloads/**/{shard}.partial")) and time.time() < deadline:
        time.sleep(0.05)
    second = cli(home, hub, "run", "tiny", "Hi", "--max-tokens", "3")
    _, err = first.communicate(timeout=120)
    hub.slow.clear()
    assert first.returncode == 0, err
    assert second.returncode == 0, second.stderr
    assert "another lilmistral is pulling tiny:latest" in second.stderr and "up to date" in second.stderr
    assert len(hub.file_requests(shard)) == 1
    assert "tiny:latest" in cli(home, hub, "list").stdout


def test_corrupted_byte_is_caught(home, hub):
    shard = shard_names(hub, "test/tiny-mistral")[0]
    hub.corrupt.add(shard)
    try:
        r = cli(home, hub, "pull", "tiny")
    finally:
        hub.corrupt.clear()
    assert r.returncode == 1 and "checksum" in r.stderr and shard in r.stderr
    assert r.stderr.strip().count("\n") <= 1 and "Traceback" not in r.stderr
    assert "tiny" not in cli(home, hub, "list").stdout
    assert not list(home.glob(f"downloads/**/{shard}*"))


def test_a_full_disk_is_one_line_and_keeps_the_download(home, hub, monkeypatch, capsys):
    """Too little space to download: said before any byte is fetched. The disk filling up meanwhile: the bytes
    that reached it are kept for the next pull. Too little to convert: the download is kept."""
    import errno
    import shutil

    import lilmistral.download

    for key, value in env_for(home, hub).items():
        monkeypatch.setenv(key, value)
    usage = shutil.disk_usage(home)

    def pull_error() -> str:
        assert main(["pull", "tiny"]) == 1
        return capsys.readouterr().err.strip().splitlines()[-1]

    with monkeypatch.context() as m:
        m.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1_000_000))
        err = pull_error()
    assert err.startswith("Error: downloading tiny:latest needs 17.") and err.endswith("which has 1.0 MB free")
    assert not hub.file_requests(shard_names(hub, "test/tiny-mistral")[0])

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(lilmistral.download.os, "fsync", full)  # where a full disk shows on some file systems
        err = pull_error()
    assert err.startswith(f"Error: no space left in {home / 'downloads'}") and "run pull again to resume" in err
    [partial] = home.glob("downloads/**/*.partial")
    have = partial.stat().st_size

    downloaded = sum(len(b) for b in hub.repos["test/tiny-mistral"]["files"].values())
    with monkeypatch.context() as m:
        m.setattr(shutil, "disk_usage", lambda path: usage._replace(free=downloaded if "downloads" in str(path)
                                                                     else 2_000_000))
        err = pull_error()
    assert err.startswith("Error: converting to int8 needs ") and err.endswith("which has 2.0 MB free")
    assert len(hub.file_requests(partial.name.removesuffix(".partial"))) == 1  # its bytes were kept
    assert partial.with_suffix("").stat().st_size == have
    assert shard_names(hub, "test/tiny-mistral") == sorted(p.name for p in partial.parent.glob("model-*"))
    assert "tiny" not in cli(home, hub, "list").stdout
    assert cli(home, hub, "pull", "tiny").returncode == 0


def test_gated_repo_needs_a_token(home, hub):
    r = cli(home, hub, "pull", "gated")
    assert r.returncode == 1 and "gated" in r.stderr and "HF_TOKEN" in r.stderr and "Traceback" not in r.stderr
    r = cli(home, hub, "pull", "gated", HF_TOKEN="hf_wrong_token_value")
    assert r.returncode == 1 and "gated" in r.stderr and "hf_wrong_token_value" not in r.stderr + r.stdout
    r = cli(home, hub, "pull", "gated", HF_TOKEN=hub.token)
    assert r.returncode == 0, r.stderr
    assert hub.token not in r.stderr + r.stdout


def test_unknown_and_unsafe_names(home, hub, monkeypatch, capsys):
    r = cli(home, hub, "pull", "tinny")
    assert r.returncode == 1 and "did you mean tiny" in r.stderr and "Traceback" not in r.stderr
    monkeypatch.setenv("LILMISTRAL_HOME", str(home))  # the rest in this process: names fail before any request
    assert main(["pull", "tiny:lates"]) == 1 and "tiny:latest" in capsys.readouterr().err
    assert main(["pull", "nemo"]) == 1 and "did you mean mistral-nemo?" in capsys.readouterr().err
    assert main(["pull", "nosuchmodel"]) == 1  # nothing near it: the known names, not a guess
    assert "; known: codestral, gated, mathstral," in capsys.readouterr().err
    for bad in ("../../etc", "/etc/passwd", "tiny:../x", "a/../../b", "..", "x\\y"):
        assert main(["pull", bad]) == 1, bad
        assert capsys.readouterr().err.startswith("Error: "), bad
    (home / "models.toml").write_text(REGISTRY + '[tinymix.tags.odd]\nrepo = "test/tiny-mixtral"\nsampling = 0.3\n')
    assert main(["pull", "tinymix:odd"]) == 1
    assert capsys.readouterr().err == ("Error: models.toml: tinymix:odd: sampling must be a table (sampling = { "
                                       "temperature = 0.3 })\n")
    assert sorted(p.name for p in home.iterdir()) == ["models.toml"]
    assert not hub.requests


def test_offline(home, hub, tmp_path):
    assert cli(home, hub, "pull", "tiny").returncode == 0
    offline = dict(HF_ENDPOINT="http://127.0.0.1:9")  # nothing listens on the discard port
    r = subprocess.run([sys.executable, "-m", "lilmistral", "pull", "tinymix"], capture_output=True, text=True,
                       timeout=120, env={**env_for(home, hub), **offline})
    assert r.returncode == 1 and "cannot reach" in r.stderr
    r = subprocess.run([sys.executable, "-m", "lilmistral", "run", "tiny", "Hi", "--max-tokens", "3"],
                       capture_output=True, text=True, timeout=120, env={**env_for(home, hub), **offline})
    assert r.returncode == 0, r.stderr
