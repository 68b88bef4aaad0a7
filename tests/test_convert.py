"""The packed format, `lilmistral convert` (HF folders and GGUF files), and bad input."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
from collections import Counter

import numpy as np
import pytest
import torch

import lilmistral
import conftest
from conftest import SPM_V1, make_hf_model, progress_bars, write_gguf
from lilmistral.cli import main
from lilmistral.convert import FORMAT_VERSION, convert, default_scheme, gguf as gguf_module, plan
from lilmistral.convert.gguf import BLOCK_TYPES, Q6_K_SPEC, GGUFSource, dequantize_blocks, q4k_parts
from lilmistral.quant import QuantExperts, QuantLinear, QuantSpec, dequantize, quantize, vnni
from lilmistral.quant.pack import pack_int4, packed_shapes, unpack_int4
from lilmistral.store import human_size

MIXTRAL = dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None)


def cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lilmistral", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {"mistral": (root / "mistral", make_hf_model(root / "mistral", "mistral", sliding_window=8)),
            "mixtral": (root / "mixtral", make_hf_model(root / "mixtral", "mixtral", **MIXTRAL))}


def test_pack_int4_round_trip():
    q = torch.randint(0, 16, (16, 64), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (16, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q)
    assert packed[0, 0].item() == q[0, 0].item() | (q[0, 1].item() << 4)  # element 2j low, 2j+1 high


@pytest.mark.parametrize("spec,max_rel", [(QuantSpec("int8"), 0.01), (QuantSpec("int4", 32, False), 0.09),
                                          (QuantSpec("int4", 64, False), 0.1), (QuantSpec("int4", 32, True), 0.1),
                                          (QuantSpec("int5", 32, False, super_block=256), 0.045),
                                          (QuantSpec("int5", 32, True), 0.05)])
def test_quantize_error_bounds(spec, max_rel):
    w = torch.randn(96, 256)
    rel = ((dequantize(quantize(w, spec), spec) - w).norm() / w.norm()).item()
    assert rel < max_rel


@pytest.mark.parametrize("spec", [QuantSpec("int8"), QuantSpec("int4", 32, False), QuantSpec("int4", 32, True),
                                  QuantSpec("int5", 32, False, super_block=256)])
def test_quantizing_in_chunks_of_rows_gives_each_rows_own_bits(spec, monkeypatch):
    """Rows are quantized a chunk at a time (float32 temporaries that fit the cache): any chunking, the
    parts of quantizing each row alone; a row of zeros too."""
    from lilmistral.quant import pack

    w = torch.randn(37, 256).bfloat16()
    w[5] = 0
    alone = [quantize(w[i:i + 1], spec) for i in range(37)]
    for chunk in (256, 1000, 2**19):  # one row, 3 rows, all
        monkeypatch.setattr(pack, "ROW_CHUNK_VALUES", chunk)
        parts = quantize(w, spec)
        assert all(torch.equal(parts[name], torch.cat([a[name] for a in alone])) for name in alone[0])


@pytest.mark.parametrize("arch", ["mistral", "mixtral"])
@pytest.mark.parametrize("scheme", ["int8", "int4", "bf16"])
def test_convert_hf_folder(hf_models, tmp_path, arch, scheme):
    folder, ref = hf_models[arch]
    out = tmp_path / "out"
    r = cli("convert", str(folder), "--quant", scheme, "--out", str(out))
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["quant"]["scheme"] == scheme
    assert manifest["source"]["kind"] == "huggingface" and len(manifest["source"]["sha256"]) == 64
    assert (out / "tokenizer.model.v3").is_file()
    quantized = set(manifest["tensors"])
    if scheme == "bf16":
        assert not quantized
    else:
        assert "layers.0.attention.wq.weight" in quantized and "tok_embeddings.weight" not in quantized
        assert not any("norm" in n or n.endswith("feed_forward.gate.weight") for n in quantized)
    # the packed parts on disk are exactly what quantizing in memory gives
    converted = lilmistral.load(out, dtype="float32")
    in_memory = lilmistral.load(folder, quant=scheme, dtype="float32").model.state_dict()
    for name, value in converted.model.state_dict().items():
        if name.endswith((".qweight", ".scales", ".mins")):
            assert torch.equal(value, in_memory[name]), name
    ids = list(range(100, 140))
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    # relative L2 error of the logits; a MoE router flipping a near-tied expert choice on a random model costs more
    tolerance = {"int8": 0.03, "int4": 0.3, "bf16": 0.03}[scheme] * (2 if arch == "mixtral" else 1)
    error = ((converted.forward(ids) - expected).norm() / expected.norm()).item()
    print(arch, scheme, f"relative logits error {error:.4f}")
    assert error < tolerance
    # and the default bfloat16 path uses the packed kernels
    fast = lilmistral.load(out)
    assert any(isinstance(m, QuantLinear) for m in fast.model.modules()) == (scheme != "bf16")
    assert len(list(fast.generate(ids, temperature=0, max_tokens=5))) <= 5


def test_gguf_mixtral_experts_float_parity(hf_models, tmp_path):
    folder, ref = hf_models["mixtral"]
    state = lilmistral.load(folder).model.state_dict()
    args = lilmistral.load(folder).args
    path = tmp_path / "mixtral.gguf"
    write_gguf(path, state, args)
    src = GGUFSource(path)
    assert src.args.n_experts == 4 and src.args.n_experts_per_tok == 2
    assert "layers.1.feed_forward.experts.3.w2.weight" in {e.name for e in src.entries}
    llm = lilmistral.load(path, quant="f32")
    ids = list(range(200, 240))
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    assert (llm.forward(ids) - expected).abs().max().item() <= 1e-4
    out = tmp_path / "converted"
    r = cli("convert", str(path), "--quant", "int8", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert lilmistral.load(out).forward(ids).shape == (40, 32768)


def test_gguf_q4_k_blocks_are_re_laid_as_super_blocked_int4():
    """Q4_K super-blocks (Q4_K_M files' usual type) become super-blocked int4 (pack.py: groups of 32, the 6-bit
    codes of each one's scale and min times the super-block's float16 d and -dmin), whose values are the gguf
    package's dequantized ones bit for bit, in 4.625 bits a weight (Q4_K's 4.5 but for the codes' two bits)."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(0)
    n, k = 40, 512
    blocks = rng.integers(0, 256, (n, k // 256, 144), dtype=np.uint8)
    for at in (0, 2):  # d and dmin: float16s of a weight's magnitude (random bytes may be NaN)
        blocks[..., at:at + 2] = rng.uniform(-1e-2, 1e-2, (n, k // 256, 1)).astype(np.float16).view(np.uint8)
    raw = blocks.reshape(n, -1)
    reference = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_K)).reshape(n, k)
    spec = gguf_module.DIRECT_INT4["Q4_K"]
    parts = q4k_parts(torch.from_numpy(raw))
    assert spec == QuantSpec("int4", 32, False, super_block=256) and torch.equal(dequantize(parts, spec), reference)
    assert {name: (tuple(t.shape), t.dtype) for name, t in parts.items()} == packed_shapes(n, k, spec)
    assert sum(t.nbytes for t in parts.values()) * 8 / (n * k) == 4.625


def test_hugging_face_weights_quantize_to_int4_in_super_blocks(tmp_path):
    """int4 (g32 with mins, the default) puts a projection's groups in super-blocks where 256 (or 192) divides
    its input size, the folder format 2: every such weight within 1% of plain int4 g32's error (5.0 bits a
    weight) in 4.625 (4.67), and the model nearer the float one than int4 g64's (4.5). With another group size,
    plain int4 (format 1)."""
    from safetensors.torch import load_file

    make_hf_model(tmp_path / "hf", hidden_size=256, intermediate_size=576)
    ids = list(range(10, 40))
    float_model = lilmistral.load(tmp_path / "hf", dtype="float32")
    out = convert(tmp_path / "hf", tmp_path / "int4", "int4")
    manifest = json.loads((out / "manifest.json").read_text())
    supers = {name.split(".", 2)[-1]: spec.get("super_block", 0) for name, spec in manifest["tensors"].items()}
    assert manifest["format_version"] == 2 and supers == {
        "attention.wq.weight": 256, "attention.wk.weight": 256, "attention.wv.weight": 256,
        "attention.wo.weight": 256, "feed_forward.w1.weight": 256, "feed_forward.w3.weight": 256,
        "feed_forward.w2.weight": 192, "weight": 0}  # w2: 576 inputs; "weight": the int8 head
    stored, weights = load_file(out / "model.safetensors"), float_model.model.state_dict()
    plain_spec = QuantSpec("int4", 32, False)
    for name, spec in manifest["tensors"].items():
        if spec.get("super_block"):
            w, base = weights[name], name.removesuffix(".weight")
            parts = {part: stored[f"{base}.{part}"] for part in packed_shapes(*w.shape, QuantSpec(**spec))}
            error = (dequantize(parts, QuantSpec(**spec)) - w).norm()
            assert error <= 1.01 * (dequantize(quantize(w, plain_spec), plain_spec) - w).norm(), name
    plain = convert(tmp_path / "hf", tmp_path / "g64", "int4", group_size=64)
    assert json.loads((plain / "manifest.json").read_text())["format_version"] == 1
    reference = float_model.forward(ids)
    errors = [(lilmistral.load(folder, dtype="float32").forward(ids) - reference).norm() for folder in (out, plain)]
    assert errors[0] < errors[1]


@pytest.mark.parametrize("arch", ["mistral", "mixtral"])
def test_a_q4_k_m_gguf_runs_its_q4_k_and_q6_k_blocks_as_they_are_and_converts_to_format_3(tmp_path, arch):
    """A GGUF laid out as llama.cpp's Q4_K_M (Q4_K tensors; the head, attn_v and ffn_down in Q6_K) loads with
    every projection (experts too) super-blocked int4 or int6, each holding the file's values: its kernels (the
    experts' batched ones at one token) compute what the float32 reference computes with them, within bfloat16's
    and int8 activations' error (~3% here, as with Q4_1 blocks). Converted, the folder says format 3 and gives
    the same logits; a newer format, or a layout a tensor cannot have, is refused in one line."""
    make_hf_model(tmp_path / "hf", arch, hidden_size=256, intermediate_size=512,
                  **(MIXTRAL if arch == "mixtral" else {}))
    base = lilmistral.load(tmp_path / "hf")
    path = tmp_path / "q4km.gguf"
    wide = ["output.weight", *(f"blk.{i}.{name}.weight" for i in range(base.args.n_layers)
                               for name in ("attn_v", "ffn_down", "ffn_down_exps"))]
    write_gguf(path, base.model.state_dict(), base.args, qtype="Q4_K", types=dict.fromkeys(wide, "Q6_K"))
    llm = lilmistral.load(path)
    int6 = QuantSpec("int6", 16, True, super_block=256)
    kinds = {name: m.spec for name, m in llm.model.named_modules() if isinstance(m, QuantLinear)}
    assert set(kinds.values()) == {QuantSpec("int4", 32, False, super_block=256), int6}
    assert all((spec == int6) == name.endswith(("output", "wv", "w2")) for name, spec in kinds.items())
    experts = [m for m in llm.model.modules() if isinstance(m, QuantExperts)]
    assert len(experts) == (2 if arch == "mixtral" else 0) and all(m.batched or not vnni.available() for m in experts)
    reference = lilmistral.load(path, dtype="float32")
    for ids in (list(range(10, 40)), [17]):
        got, expected = llm.forward(ids), reference.forward(ids)
        assert ((got - expected).norm() / expected.norm()).item() < 0.05
    out = convert(path, tmp_path / "converted", "int4")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format_version"] == 3 and manifest["direct_tensors"] == len(kinds)
    assert all(spec["super_block"] == 256 for spec in manifest["tensors"].values())
    converted = lilmistral.load(out)
    for ids in (list(range(10, 40)), [17]):
        assert torch.equal(converted.forward(ids), llm.forward(ids))
    shown = cli("show", str(out))
    counts = Counter(spec["scheme"] for spec in manifest["tensors"].values())
    layouts = f"(tensors {counts['int4']} int4 g32 in super-blocks of 256, {counts['int6']} int6)"
    assert shown.returncode == 0 and layouts in shown.stdout
    newer = FORMAT_VERSION + 1
    (out / "manifest.json").write_text(json.dumps(manifest | {"format_version": newer, "tensors": {}}))
    assert_one_line_error(cli("run", str(out), "Hi"), f"made by a newer lilmistral (format {newer})")
    name = "layers.0.attention.wq.weight"  # a layout the file cannot have: one line, as any bad file
    for layout, words in (({"super_block": 48}, "unknown layout"), ({"bits": 3}, "unknown layout"),
                          ({"super_block": 96}, "not whole groups")):
        tensors = manifest["tensors"] | {name: manifest["tensors"][name] | layout}
        (out / "manifest.json").write_text(json.dumps(manifest | {"tensors": tensors}))
        assert_one_line_error(cli("run", str(out), "Hi"), name, words)
    damaged = [("{oops", "JSONDecodeError"), (json.dumps(manifest | {"tensors": []}), "TypeError"),
               (json.dumps({k: v for k, v in manifest.items() if k != "args"}), "KeyError: 'args'")]
    for text, words in damaged[:1 if arch == "mixtral" else None]:  # edited by hand, or a disk's damage
        (out / "manifest.json").write_text(text)
        assert_one_line_error(cli("run", str(out), "Hi"), "manifest.json: not a lilmistral manifest", words)
    assert_one_line_error(cli("show", str(out)), "manifest.json: not a lilmistral manifest", words)


def test_a_q6_k_gguf_loads_as_int6_with_its_values_unless_int8_is_asked_for(tmp_path):
    """A Q6_K file (head too) loads as int6 by default, every tensor the gguf package's dequantized values bit for
    bit, and converts to format 3; asked for int8, it gets int8."""
    make_hf_model(tmp_path / "hf", "mistral", hidden_size=256, intermediate_size=512)
    base = lilmistral.load(tmp_path / "hf")
    path = tmp_path / "q6k.gguf"
    write_gguf(path, base.model.state_dict(), base.args, qtype="Q6_K")
    src = GGUFSource(path)
    assert default_scheme(src) == "int6"
    planned = plan(src, "int6")
    quantized = [p for p in planned if p.spec is not None]
    assert all(p.direct and p.spec == Q6_K_SPEC for p in quantized) and len(quantized) == 1 + 7 * base.args.n_layers
    for p in quantized[:3]:
        assert torch.equal(dequantize(src.read_packed(p.entry, p.spec), p.spec), src.read(p.entry))
    assert {p.spec for p in plan(src, "int8") if p.spec is not None} == {QuantSpec("int8")}
    llm, reference = lilmistral.load(path), lilmistral.load(path, dtype="float32")
    got, expected = llm.forward(list(range(10, 40))), reference.forward(list(range(10, 40)))
    assert ((got - expected).norm() / expected.norm()).item() < 0.05
    out = convert(path, tmp_path / "converted", "int6")
    assert json.loads((out / "manifest.json").read_text())["format_version"] == 3
    assert torch.equal(lilmistral.load(out).forward([5, 6, 7]), llm.forward([5, 6, 7]))


@pytest.mark.parametrize("qtype", ["Q5_0", "Q5_1"])
def test_a_5_bit_gguf_loads_as_int5_with_its_values(tmp_path, qtype):
    """GGUF's 5-bit types (Q5_K with them: test_gguf_block_decoders_give_the_gguf_packages_bits; the gguf package
    cannot write it) load as int5 by default, every projection the file's values bit for bit (the head in Q6_K,
    as llama.cpp writes it, int6): the model computes what the file's dequantized one does, within float rounding
    (int6, requantized, moved them). `convert` with no --quant writes what `run` runs (format 4)."""
    make_hf_model(tmp_path / "hf", "mistral", hidden_size=256, intermediate_size=512)
    base = lilmistral.load(tmp_path / "hf")
    path = tmp_path / f"{qtype}.gguf"
    write_gguf(path, base.model.state_dict(), base.args, qtype=qtype, types={"output.weight": "Q6_K"})
    src = GGUFSource(path)
    assert default_scheme(src) == "int5"
    planned = {p.entry.name: p for p in plan(src, "int5") if p.spec is not None}
    head = planned.pop("output.weight")
    assert head.direct and head.spec == Q6_K_SPEC and len(planned) == 7 * base.args.n_layers
    assert all(p.direct and p.spec == gguf_module.DIRECT_INT5[qtype] for p in planned.values())
    for p in list(planned.values())[:3]:
        assert torch.equal(dequantize(src.read_packed(p.entry, p.spec), p.spec), src.read(p.entry))
    ids = list(range(10, 40))
    values = lilmistral.load(path, quant="f32").forward(ids)  # the file's values, dequantized

    def error(quant: str | None) -> float:
        got = lilmistral.load(path, quant=quant, dtype="float32").forward(ids)
        return ((got - values).norm() / values.norm()).item()

    assert error(None) < 1e-5 < error("int6") / 100
    llm = lilmistral.load(path)  # the int5 kernels, bfloat16 and int8 activations
    assert ((llm.forward(ids) - values).norm() / values.norm()).item() < 0.05
    r = cli("convert", str(path), "--out", str(tmp_path / "converted"))
    assert r.returncode == 0 and "(int5," in r.stdout, r.stdout + r.stderr
    manifest = json.loads((tmp_path / "converted" / "manifest.json").read_text())
    assert manifest["quant"]["scheme"] == "int5" and manifest["format_version"] == 4
    assert torch.equal(lilmistral.load(tmp_path / "converted").forward(ids), llm.forward(ids))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "F16"])
def test_gguf_block_types(hf_models, tmp_path, qtype):
    folder, _ = hf_models["mistral"]
    base = lilmistral.load(folder)
    path = tmp_path / f"m-{qtype}.gguf"
    write_gguf(path, base.model.state_dict(), base.args, qtype=qtype)
    src = GGUFSource(path)
    entry = next(e for e in src.entries if e.name == "layers.0.attention.wq.weight")
    assert entry.source_type == qtype
    float_weight = src.read(entry)
    spec = src.direct_spec(entry, QuantSpec("int4", 32, False))
    if qtype in ("Q4_0", "Q4_1"):  # Q4_0 and Q4_1 map onto int4 g32 bit for bit
        assert spec == QuantSpec("int4", 32, qtype == "Q4_0")
        assert torch.equal(dequantize(src.read_packed(entry, spec), spec), float_weight)
    else:
        assert spec is None
    llm = lilmistral.load(path, quant="int4")
    assert len(list(llm.generate([1, 2, 3, 4], temperature=0, max_tokens=4))) <= 4


def test_show_describes_a_gguf_and_a_hf_folder_without_loading_them(hf_models, tmp_path, capsys):
    """`show` takes what `run` takes. A GGUF's strings are untrusted: an escape sequence is not printed."""
    folder, _ = hf_models["mistral"]
    base = lilmistral.load(folder)
    path = tmp_path / "m.gguf"
    write_gguf(path, base.model.state_dict(), base.args, qtype="Q4_0", types={"blk.1.ffn_down.weight": "Q8_0"},
               strings={"general.name": "tiny\x1b]0;pwned\x07", "general.license": "apache-2.0"})
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "tiny?]0;pwned?" in out
    for words in ("LlamaForCausalLM: 2 layers, dim 64", "parameters    4.27M", "tensors 14 Q4_0, 6 F32, 1 Q8_0", "runs as int4", "gguf llama, 32000 tokens",
                  "chat format   Mistral instruct", "apache-2.0", f"size on disk  {human_size(path.stat().st_size)}"):
        assert words in out, out
    assert main(["show", str(folder), "--pp", "2"]) == 0
    out = capsys.readouterr().out
    for words in ("MistralForCausalLM: 2 layers", "sliding window 8", "tensors 21 F32; runs as stored", "--quant", "tokenizer.model.v3",
                  "mistral_common", "stage 1: layers 1-1"):
        assert words in out, out


def test_a_split_gguf_is_one_model(hf_models, tmp_path, capsys):
    """llama.cpp's gguf-split parts (NAME-00001-of-0000N.gguf; the first holds the metadata) load, convert and
    show as the one file they were split from, from whichever part is named; a missing part is one line."""
    folder, _ = hf_models["mistral"]
    base = lilmistral.load(folder)
    whole = tmp_path / "whole" / "tiny.gguf"
    parts = tmp_path / "parts" / "tiny.gguf"
    for path, split in ((whole, 0), (parts, 7)):
        path.parent.mkdir()
        write_gguf(path, base.model.state_dict(), base.args, qtype="Q4_0", split_tensors=split)
    names = sorted(p.name for p in parts.parent.iterdir())
    assert len(names) > 2 and names[0] == f"tiny-00001-of-{len(names):05d}.gguf"
    first, last = parts.parent / names[0], parts.parent / names[-1]
    ids = list(range(10, 40))
    reference = lilmistral.load(whole).forward(ids)
    assert torch.equal(lilmistral.load(last).forward(ids), reference)
    r = cli("convert", f"parts/{first.name}", "--quant", "int4", cwd=tmp_path)  # named after the file, not its part
    assert r.returncode == 0, r.stderr
    assert torch.equal(lilmistral.load(tmp_path / "tiny-int4").forward(ids), reference)
    assert main(["show", str(first)]) == 0
    shown = capsys.readouterr().out
    size = sum(p.stat().st_size for p in parts.parent.iterdir())
    assert f"split in {len(names)} files" in shown and human_size(size) in shown
    last.unlink()
    assert_one_line_error(cli("run", str(first), "Hi"), last.name, "missing")


def test_gguf_with_mixed_block_types(hf_models, tmp_path, monkeypatch):
    """llama.cpp's files mix block types (here one attn_v in Q4_0 among Q4_1, and one ffn_down in Q8_0, as
    Q4_K_M keeps some in Q6_K): each tensor keeps its own exact int4 layout, the wider one becomes int8 (not
    int4, unless the file is asked for int4 while stored wider), projections packed differently are not fused,
    and the model computes what the float32 dequantized one does."""
    folder, _ = hf_models["mistral"]
    base = lilmistral.load(folder)
    path = tmp_path / "mixed.gguf"
    write_gguf(path, base.model.state_dict(), base.args, qtype="Q4_1",
               types={"blk.0.attn_v.weight": "Q4_0", "blk.1.ffn_down.weight": "Q8_0"})
    llm = lilmistral.load(path)
    first, second = (layer.attention for layer in llm.model.layers[:2])
    assert first.wv.spec.symmetric and not first.wq.spec.symmetric and first.wqkv is None
    assert second.wqkv is not None and llm.model.layers[0].feed_forward.w13 is not None
    assert [layer.feed_forward.w2.spec.scheme for layer in llm.model.layers[:2]] == ["int4", "int8"]
    wide = tmp_path / "q8.gguf"
    write_gguf(wide, base.model.state_dict(), base.args, qtype="Q8_0")
    assert lilmistral.load(wide, quant="int4").model.layers[1].feed_forward.w2.spec.scheme == "int4"
    # blocks become int8 a few rows at a time, without a float32 copy of the tensor: the same bits
    monkeypatch.setattr(gguf_module, "INT8_CHUNK_BYTES", 1000)  # many chunks
    src = GGUFSource(path)
    entry = next(e for e in src.entries if e.name == "layers.1.feed_forward.w2.weight")
    packed, requantized = src.read_packed(entry, QuantSpec("int8")), quantize(src.read(entry), QuantSpec("int8"))
    assert all(torch.equal(packed[k], requantized[k]) for k in ("qweight", "scales"))
    int8 = lilmistral.load(path, quant="int8")  # Q4 blocks too, asked for int8: int8, not re-laid as int4
    assert {m.spec.scheme for m in int8.model.modules() if isinstance(m, QuantLinear)} == {"int8"}
    ids = list(range(10, 40))
    got, reference = llm.forward(ids), lilmistral.load(path, dtype="float32").forward(ids)
    assert ((got - reference).norm() / reference.norm()).item() < 0.02


def test_each_layer_is_repacked_as_soon_as_its_tensors_have_come(hf_models, tmp_path, monkeypatch):
    """A GGUF's int4 parts are made in memory: the loader repacks each layer's (letting go of them) after its
    last tensor and before the next layer's first, so the next layer's reuse their memory, not fresh pages."""
    from lilmistral import loader

    folder, _ = hf_models["mistral"]
    base = lilmistral.load(folder)
    path = tmp_path / "m.gguf"
    write_gguf(path, base.model.state_dict(), base.args, qtype="Q4_0")
    events, real_produce, real_repack = [], loader.produce, loader.repack

    def produce(src, planned):
        for name, tensor in real_produce(src, planned):
            events.append(name)
            yield name, tensor

    def repack(module, *args, **kwargs):
        events.append(module)
        real_repack(module, *args, **kwargs)

    monkeypatch.setattr(loader, "produce", produce)
    monkeypatch.setattr(loader, "repack", repack)
    llm = lilmistral.load(path)
    names = [e if isinstance(e, str) else "" for e in events]
    for i, layer in enumerate(llm.model.layers):
        last = max(j for j, name in enumerate(names) if name.startswith(f"layers.{i}."))
        assert events[last + 1] is layer and not any(n.startswith(f"layers.{i}.") for n in names[last + 1:])
        assert layer.attention.wqkv is not None and not layer.attention.wq.parts()  # fused, its parts let go
    assert events[-1] is llm.model  # then the rest: the head
    ids = list(range(10, 30))
    got, reference = llm.forward(ids), lilmistral.load(path, dtype="float32").forward(ids)  # the dequantized weights
    assert ((got - reference).norm() / reference.norm()).item() < 0.02


def test_gguf_llama_vocab_matches_sentencepiece(hf_models, tmp_path):
    import sentencepiece

    folder, _ = hf_models["mistral"]
    base = lilmistral.load(folder)
    path = tmp_path / "vocab.gguf"
    write_gguf(path, base.model.state_dict(), base.args)
    tok = lilmistral.load(path, quant="f32").tokenizer
    sp = sentencepiece.SentencePieceProcessor(model_file=str(SPM_V1))
    for text in ["Hello world", "The capital of France is Paris.", "naïve café 😀 日本語", "  two spaces",
                 "line\nbreak\ttab", "1234567 + 89 = ?"]:
        assert tok.encode(text) == sp.encode(text), text
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids == [1, *sp.encode("[INST] Hi [/INST]")]


def test_chat_template_is_sandboxed():
    from lilmistral.chat import render_chat_template

    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(lilmistral.LilmistralError):
        render_chat_template(evil, [{"role": "user", "content": "x"}])
    evil = "{{ cycler.__init__.__globals__.os.system('echo pwned') }}"
    with pytest.raises(lilmistral.LilmistralError):
        render_chat_template(evil, [{"role": "user", "content": "x"}])
    assert render_chat_template("{% for m in messages %}{{ m['content'] | tojson }}{% endfor %}",
                                [{"role": "user", "content": "é"}]) == '"é"'


BOMBS = ["{{ 'a' * 10**10 }}", "{{ ('a' * 1000000) * 1000000 }}", "{{ 9 ** 9 ** 9 }}",
         "{{ 'a'.center(10**10) }}", "{{ 'a'|center(10**10) }}", "{{ (['a' * 1000000] * 1000)|join }}",
         "{{ '%999999999d' % 1 }}", "{% for i in range(100000) %}{% for j in range(100000) %}xxxx{% endfor %}{% endfor %}"]


@pytest.mark.parametrize("bomb", BOMBS)
def test_a_chat_template_cannot_take_all_the_memory(bomb):
    """Each would make a gigabyte or more (the first, tried before the limit, took all of this machine's 24 GB
    and was killed by the kernel)."""
    from lilmistral.chat import render_chat_template

    with pytest.raises(lilmistral.LilmistralError, match="too large"):
        render_chat_template(bomb, [{"role": "user", "content": "x"}])


ENDLESS = ["{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
           "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}",
           "{% for x in [0] recursive %}{% if x < 40 %}{{ loop([x + 1, x + 1]) }}{% endif %}{% endfor %}",
           "{% set s = 'a' * 8000000 %}{% for i in range(100000) %}{% if s == s ~ '' %}{% endif %}{% endfor %}",
           "{% for i in range(100000) %}{% for c in 'ab' * 100000 %}{% set x = c %}{% endfor %}{% endfor %}"]


@pytest.mark.parametrize("endless", ENDLESS)
def test_a_chat_template_cannot_run_for_ever(endless, monkeypatch):
    """Loops that write nothing, a macro or a recursive loop branching 2^40 times, comparisons of 8 MB strings
    10^5 times: each ran on (until Ctrl-C) before renders had a deadline."""
    from lilmistral import chat

    monkeypatch.setattr(chat, "TEMPLATE_SECONDS", 0.5)
    start = time.monotonic()
    with pytest.raises(lilmistral.LilmistralError, match="ran for over 0.5 s"):
        chat.render_chat_template(endless, [{"role": "user", "content": "x"}])
    assert time.monotonic() - start < 5


def test_a_chat_templates_own_faults_are_one_line_and_ordinary_templates_still_render():
    from lilmistral.chat import render_chat_template

    for fault in ("{{ 1 / 0 }}", "{{ 'a' + 1 }}", "{{ messages[0]['content'].foo() }}"):
        with pytest.raises(lilmistral.LilmistralError, match="chat template failed"):
            render_chat_template(fault, [{"role": "user", "content": "x"}])
    ordinary = "{{ '-' * 80 }}{{ messages[0]['content'] * 3 }}{{ '%5d|%-3s' % (4, 'ab') }}{{ 2 ** 10 }}{{ 'x'|center(5) }}"
    assert render_chat_template(ordinary, [{"role": "user", "content": "hi"}]) == "-" * 80 + "hihihi    4|ab 1024  x  "
    loops = ("{% for m in messages %}{{ loop.index0 }}/{{ loop.length }}{% if loop.last %}!{% endif %}{% endfor %}"
             "{% for m in [] %}x{% else %}none{% endfor %}"
             "{% for x in [[1, [2]]] recursive %}<{% if x is iterable %}{{ loop(x) }}{% else %}{{ x }}{% endif %}>{% endfor %}")
    assert render_chat_template(loops, [{"role": "user", "content": "hi"}] * 2) == "0/21/2!none<<1><<2>>>"


def assert_one_line_error(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in r.stderr, r.stderr


def test_gguf_header_matches_the_gguf_package_and_refuses_every_truncation(tmp_path):
    import gguf

    path = tmp_path / "header.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    words = ["", "a", "Ġthe", "▁é", "日本語", "<0x0A>", "x" * 300]
    w.add_token_list(words)
    w.add_token_merges(["Ġ t", "i n"])
    w.add_token_types([1, 3, 6, 1, 1, 6, 1])
    w.add_chat_template("{{ messages }}")
    w.add_tensor("t", np.zeros((2, 32), dtype=np.float32))
    for write in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file):
        write()
    w.close()
    metadata, table = gguf_module.read_gguf_header(path)
    reader = gguf.GGUFReader(str(path))
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.chat_template"):
        assert metadata[key] == reader.fields[key].contents(), key
    assert [(t.name, t.shape, t.type_name) for t in table] == [("t", (32, 2), "F32")]
    data = path.read_bytes()
    header_end = table[0].data_offset
    cut = tmp_path / "cut.gguf"
    for n in range(8, header_end - 64):  # the tensor table's end is padded to the alignment
        cut.write_bytes(data[:n])
        with pytest.raises(ValueError):
            gguf_module.read_gguf_header(cut)


def test_bad_inputs_give_one_line_and_write_nothing(hf_models, tmp_path):
    import shutil

    folder, _ = hf_models["mistral"]
    outdir = tmp_path / "outs"
    outdir.mkdir()
    # a truncated safetensors file
    bad = tmp_path / "truncated"
    shutil.copytree(folder, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_one_line_error(cli("convert", str(bad), "--out", str(outdir / "a")), "model.safetensors", "truncated")
    # a missing shard
    sharded = tmp_path / "sharded"
    shutil.copytree(folder, sharded)
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    assert_one_line_error(cli("convert", str(sharded), "--out", str(outdir / "b")), "model-00002-of-00002", "missing")
    # a GGUF with a wrong magic
    base = lilmistral.load(folder)
    wrong = tmp_path / "wrong.gguf"
    write_gguf(wrong, base.model.state_dict(), base.args, magic_ok=False)
    assert_one_line_error(cli("convert", str(wrong), "--out", str(outdir / "c")), "wrong.gguf")
    # a GGUF with a tensor type lilmistral does not read
    odd = tmp_path / "odd.gguf"
    write_gguf(odd, base.model.state_dict(), base.args, raw_types={"blk.1.attn_v.weight": "IQ4_NL"})
    assert_one_line_error(cli("convert", str(odd), "--out", str(outdir / "d")), "odd.gguf", "IQ4_NL",
                          "blk.1.attn_v.weight")
    # a folder that is already converted
    converted = convert(folder, tmp_path / "converted", "int8")
    assert_one_line_error(cli("convert", str(converted), "--out", str(outdir / "e")), "already a converted model")
    assert list(outdir.iterdir()) == []  # nothing written, not even a partial folder


DAMAGED_ARGS = [  # a converted folder's manifest, edited (found by fuzzing): each was a traceback or a hang, but
    # head_dim 3 (one line already, on its groups)
    ("mistral", {"n_layers": 1}, "the config says 1 layers, the weights have 2"),
    ("mistral", {"rope_scaling": 0}, "rope_scaling is 0"),
    ("mistral", {"sliding_window": True}, "sliding_window is True"),
    ("mistral", {"head_dim": 3}, "head_dim 3 is odd"),
    ("mixtral", {"n_experts": 2 ** 40}, "the config says 1099511627776 experts, the weights have 4"),
    ("mixtral", {"n_experts_per_tok": 5}, "5 experts a token of 4"),
]


@pytest.mark.parametrize("arch,edit,words", DAMAGED_ARGS)
def test_a_converted_folders_architecture_at_odds_with_its_weights_is_one_line(hf_models, tmp_path, monkeypatch,
                                                                               capsys, arch, edit, words):
    monkeypatch.setenv("LILMISTRAL_HOME", str(tmp_path / "home"))
    out = convert(hf_models[arch][0], tmp_path / "converted", "int4")
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps(manifest | {"args": manifest["args"] | edit}))
    capsys.readouterr()
    assert main(["run", str(out), "Hi", "--max-tokens", "2", "--no-save"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err


@pytest.mark.parametrize("edit,words", [({"head_dim": 2 ** 40}, "attention.wq.weight has shape"),
                                        ({"hidden_size": 2 ** 40}, "tok_embeddings.weight has shape"),
                                        ({"num_hidden_layers": 2 ** 40}, "the config says 1099511627776 layers"),
                                        ({"architectures": "GPT2LMHeadModel"}, "architecture 'GPT2LMHeadModel'"),
                                        ({"architectures": {"a": 1}}, "architecture {'a': 1}")])
def test_a_config_json_of_impossible_sizes_or_architecture_is_one_line(hf_models, tmp_path, monkeypatch, capsys, edit, words):
    """Said before: "the model does not fit in memory: it needs 72057594 GB" (a KV cache of those sizes), which
    blames the machine; now the config's sizes are checked against the weights', before a model is made of
    them (head_dim 2 ** 40 would make RoPE's tables in memory). `architectures` as one name, not a list, said
    "unsupported architecture 'G'" (its first letter)."""
    import shutil

    monkeypatch.setenv("LILMISTRAL_HOME", str(tmp_path / "home"))
    folder = tmp_path / "hf"
    shutil.copytree(hf_models["mixtral"][0], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | edit))
    capsys.readouterr()
    assert main(["run", str(folder), "Hi", "--no-save"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err


def gpt2_vocab(merges: list[str]):
    def vocab(w) -> None:
        w.add_tokenizer_model("gpt2")
        w.add_token_list(["a", "b", "ab", "</s>"])
        w.add_token_types([1, 1, 1, 3])
        w.add_token_merges(merges)
        w.add_eos_token_id(3)
    return vocab


DAMAGED_METADATA = {  # what a damaged GGUF's metadata may say (found by fuzzing SmolLM2's), the error's words
    "no layers": (lambda w, args: w.add_block_count(0), "n_layers is 0"),
    "2 ** 40 layers": (lambda w, args: w.add_uint64("llama.block_count", 2 ** 40),
                       "the config says 1099511627776 layers, the weights have 2"),
    "odd heads": (lambda w, args: w.add_head_count(3), "multiple of n_heads 3"),
    "huge FFN": (lambda w, args: w.add_uint64("llama.feed_forward_length", 2 ** 40), "w1.weight has shape"),
    "kv heads": (lambda w, args: w.add_head_count_kv(args.n_heads), "wk.weight has shape"),
    "eos id": (lambda w, args: w.add_eos_token_id(10 ** 6), "eos_token_id 1000000 is not a token"),
    "scores": (lambda w, args: w.add_token_scores([0.5]), "scores does not give each token a number"),
    "types": (lambda w, args: w.add_token_types([1]), "token_type does not give each token"),
    "merges": (lambda w, args: gpt2_vocab(["a c"])(w), "merges do not fit its vocabulary"),
    "merge": (lambda w, args: gpt2_vocab(["ab"])(w), "merges has entries that are not two tokens"),
}


def test_show_takes_odd_descriptive_gguf_fields_as_missing(hf_models, tmp_path, capsys):
    """A name, licence or file type of another type made show refuse the file (run never read them)."""
    base = lilmistral.load(hf_models["mistral"][0])
    path = tmp_path / "odd.gguf"

    def vocab(w) -> None:
        conftest.add_spm_vocab(w)
        w.add_uint32("general.name", 5)
        w.add_bool("general.license", True)
        w.add_string("general.file_type", "Q4_0")

    write_gguf(path, base.model.state_dict(), base.args, vocab=vocab)
    capsys.readouterr()
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["model", "odd"] and "tensors 21 F32;" in out, out  # no name, no type


def test_show_of_a_folder_with_a_damaged_tokenizer_config_is_one_line(hf_models, tmp_path, capsys):
    """It was a JSONDecodeError (or, for a JSON list, an AttributeError) traceback."""
    import shutil

    folder = tmp_path / "hf"
    shutil.copytree(hf_models["mistral"][0], folder)
    (folder / "tokenizer_config.json").write_text("{oops")
    capsys.readouterr()
    assert main(["show", str(folder)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tokenizer_config.json: cannot read JSON" in err, err
    (folder / "tokenizer_config.json").write_text("[1]")
    assert main(["show", str(folder)]) == 0


@pytest.mark.parametrize("case", DAMAGED_METADATA)
def test_gguf_metadata_at_odds_with_its_tensors_or_vocabulary_is_one_line(hf_models, tmp_path, monkeypatch, capsys,
                                                                          case):
    """One line naming the file. Fuzzing SmolLM2's metadata found tracebacks: RoPE's rows reshaped by the wrong
    head count, 2 ** 40 columns allocated, the tokenizers package's exceptions, ids out of range; here, before,
    "scores" and the merges were tracebacks, "eos id" and "types" ran, the rest named no file."""
    monkeypatch.setenv("LILMISTRAL_HOME", str(tmp_path / "home"))
    damage, words = DAMAGED_METADATA[case]
    base = lilmistral.load(hf_models["mistral"][0])
    path = tmp_path / "damaged.gguf"
    write_gguf(path, base.model.state_dict(), base.args,
               vocab=lambda w: (conftest.add_spm_vocab(w), damage(w, base.args)))
    capsys.readouterr()
    assert main(["run", str(path), "Hi", "--max-tokens", "2", "--no-save"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and "damaged.gguf" in err, err


def edit_safetensors_header(path, edit) -> None:
    import struct

    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header, body = edit(json.loads(data[8:8 + n]), data[8 + n:])
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)


def first_tensor(edit):  # an edit of the first tensor's entry
    def edited(header, body):
        name = next(k for k in header if k != "__metadata__")
        return header | {name: edit(header[name])}, body
    return edited


BAD_HEADERS = {  # what the safetensors package refuses (or a Python exception was raised on), the error's words
    "a list": (lambda h, body: ([1, 2], body), "not a JSON object"),
    "metadata of numbers": (lambda h, body: (h | {"__metadata__": {"a": 1}}, body), "__metadata__"),
    "an entry of text": (first_tensor(lambda info: "x"), "has no shape or data_offsets"),
    "one offset": (first_tensor(lambda info: info | {"data_offsets": info["data_offsets"][:1]}), "unpack"),
    "offsets of text": (first_tensor(lambda info: info | {"data_offsets": ["a", "b"]}), "not counts"),
    "negative offsets": (first_tensor(lambda info: info | {"data_offsets": [x - 8 for x in info["data_offsets"]]}),
                         "not counts"),
    "overlapping tensors": (lambda h, body: ({k: v | {"data_offsets": [0, 16]} if k != "__metadata__" else v
                                              for k, v in h.items()}, body), "runs past the end"),
    "bytes after the data": (lambda h, body: (h, body + b"\0" * 8), "8 bytes after the last tensor"),
    "a layer not numbered": (lambda h, body: ({k.replace("layers.1.", "layers.x."): v for k, v in h.items()}, body),
                             "layers"),  # HF: an unexpected tensor; converted: 1 layer of 2
}


@pytest.mark.parametrize("case", BAD_HEADERS)
def test_a_corrupt_safetensors_header_is_one_line(hf_models, tmp_path, monkeypatch, capsys, case):
    """A HF folder's (show reads its header) and a converted folder's (run maps it with the safetensors package,
    after lilmistral's own check of the header). Before, show raised Python's exceptions on the first, third,
    fourth and fifth, and took the second, sixth and "bytes after the data", which the safetensors package refuses
    (a traceback). "a layer not numbered" keeps check_counts reading numbers by pattern."""
    import shutil

    monkeypatch.setenv("LILMISTRAL_HOME", str(tmp_path / "home"))
    edit, words = BAD_HEADERS[case]
    folder = tmp_path / "hf"
    shutil.copytree(hf_models["mistral"][0], folder)
    converted = convert(folder, tmp_path / "converted", "int4")
    for path, argv in ((folder, ["show", str(folder)]), (converted, ["run", str(converted), "Hi", "--no-save"])):
        edit_safetensors_header(path / "model.safetensors", edit)
        capsys.readouterr()
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err
        assert "model.safetensors" in err or "the config says 2 layers, the weights have 1" in err, err


def test_a_disk_that_fills_up_while_converting_is_one_line_and_leaves_nothing(hf_models, tmp_path, monkeypatch,
                                                                              capsys):
    import errno

    from lilmistral.convert.safetensors_io import SafetensorsWriter

    def full(self, name, tensor):
        raise OSError(errno.ENOSPC, "No space left on device")  # as a write() raises it: no file name

    monkeypatch.setattr(SafetensorsWriter, "write", full)
    folder, _ = hf_models["mistral"]
    assert main(["convert", str(folder), "--out", str(tmp_path / "out" / "m")]) == 1
    assert capsys.readouterr().err.splitlines() == ["Error: no space left on the device"]
    assert list((tmp_path / "out").iterdir()) == []


def test_convert_at_a_terminal_shows_the_bytes_it_writes(hf_models, tmp_path):
    """Its bar counted tensors and said they were bytes ("272/272 bytes" for SmolLM2)."""
    folder, _ = hf_models["mistral"]
    out = tmp_path / "out"
    bars, shown = progress_bars("convert", str(folder), "--quant", "int8", "--out", str(out))
    written = (out / "model.safetensors").stat().st_size
    assert bars.keys() == {"converting"} and abs(bars["converting"] / written - 1) < 0.02, (bars, written)
    assert f"wrote {out}" in shown


def test_interrupted_convert_leaves_nothing(hf_models, tmp_path):
    """Ctrl-C part-way: the temporary folder is removed and no output folder appears."""
    folder, _ = hf_models["mixtral"]
    code = textwrap.dedent(f"""
        import lilmistral.convert as c
        def on_write(total):
            written = []
            def on_bytes(n):
                written.append(n)
                if sum(written) > total / 2:
                    raise KeyboardInterrupt
            return on_bytes
        c.convert(c.Path({str(folder)!r}), c.Path({str(tmp_path / 'out')!r}), "int4", on_write=on_write)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "KeyboardInterrupt" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_convert_streams_with_bounded_memory(tmp_path):
    """A ~1 GB float32 model converts with peak RSS far below its size: one tensor at a time."""
    from safetensors.torch import save_file

    src = tmp_path / "big"
    src.mkdir()
    dim, hidden, layers = 1024, 4096, 12
    cfg = dict(architectures=["MistralForCausalLM"], hidden_size=dim, intermediate_size=hidden,
               num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8, vocab_size=8000,
               max_position_embeddings=4096, sliding_window=None)
    (src / "config.json").write_text(json.dumps(cfg))
    (src / "tokenizer.model").write_bytes(SPM_V1.read_bytes())
    index, total, largest = {}, 0, 0
    g = torch.Generator().manual_seed(0)
    for i in range(layers):  # one shard per layer, like a real sharded checkpoint
        p = f"model.layers.{i}."
        shard = {p + "self_attn.q_proj.weight": (dim, dim), p + "self_attn.k_proj.weight": (dim, dim),
                 p + "self_attn.v_proj.weight": (dim, dim), p + "self_attn.o_proj.weight": (dim, dim),
                 p + "mlp.gate_proj.weight": (hidden, dim), p + "mlp.up_proj.weight": (hidden, dim),
                 p + "mlp.down_proj.weight": (dim, hidden), p + "input_layernorm.weight": (dim,),
                 p + "post_attention_layernorm.weight": (dim,)}
        tensors = {k: torch.randn(s, generator=g) * 0.02 for k, s in shard.items()}
        name = f"model-{i:05d}.safetensors"
        save_file(tensors, src / name)
        index.update({k: name for k in tensors})
        total += sum(t.nbytes for t in tensors.values())
        largest = max(largest, max(t.nbytes for t in tensors.values()))
    extra = {"model.embed_tokens.weight": torch.randn(8000, dim, generator=g), "model.norm.weight": torch.ones(dim),
             "lm_head.weight": torch.randn(8000, dim, generator=g)}
    save_file(extra, src / "model-extra.safetensors")
    index.update({k: "model-extra.safetensors" for k in extra})
    total += sum(t.nbytes for t in extra.values())
    largest = max(largest, max(t.nbytes for t in extra.values()))
    del tensors, extra
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))

    def peak_rss_kb(statement: str) -> int:
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent (pytest) across exec
        code = (f"import re, lilmistral.cli; {statement}; "
                "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return int(r.stdout.split()[-1])

    base_kb = peak_rss_kb("import lilmistral.convert")  # the code convert runs, torch with it
    peak_kb = peak_rss_kb(f"lilmistral.cli.main(['convert', {str(src)!r}, '--quant', 'int4', '--out', "
                          f"{str(tmp_path / 'out')!r}])")
    assert (tmp_path / "out" / "manifest.json").is_file()
    bound = 6 * largest  # the tensor, its float32 copy and the quantizer's temporaries
    assert total > 2 * bound
    print(f"convert peak RSS {peak_kb / 1024:.0f} MB, {base_kb / 1024:.0f} MB after imports; model {total / 1e6:.0f} MB")
    assert (peak_kb - base_kb) * 1024 < bound, f"grew {(peak_kb - base_kb) / 1024:.0f} MB for a {total / 1e9:.2f} GB model"


@pytest.mark.parametrize("kernels", [True, False], ids=["cpp", "fallback"])
@pytest.mark.parametrize("kind", BLOCK_TYPES)
def test_gguf_block_decoders_give_the_gguf_packages_bits(kind, kernels, monkeypatch):
    """Every block type as a GGUF load decodes it (in C++ where lilmistral's CPU kernels are built; else Q8_0,
    Q4_K and Q6_K by PyTorch, the rest by the gguf package) gives the gguf package's values bit for bit, on
    random blocks (random quants, scales and mins) with a row of zeros and one of tiny values; straight to int8,
    quantize_int8's bits of those values; Q4 and Q5 blocks re-laid as int4 and int5 parts of those values, alike
    both ways."""
    import gguf
    import numpy as np

    built = vnni.available()
    if kernels and not built:
        pytest.skip("no lilmistral CPU kernels (no AVX2, or no C++ compiler)")
    monkeypatch.setattr(vnni, "available", lambda: kernels)
    monkeypatch.setattr(gguf_module, "INT8_CHUNK_BYTES", 20000)  # the fallback's int8: a few chunks of rows
    qtype = gguf.GGMLQuantizationType[kind]
    values, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (40, 2048 // values, block_bytes), dtype=np.uint8)
    halves = {"Q4_1": (0, 2), "Q5_1": (0, 2), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}.get(kind, (0,))
    for at in halves:  # finite float16 scales and mins (random bytes: NaNs)
        halves_at = (rng.standard_normal(blocks.shape[:2]) * 0.01).astype(np.float16)
        blocks[..., at:at + 2] = halves_at[..., None].view(np.uint8)
    blocks[0] = 0
    blocks[1, :, halves[0]:halves[0] + 2] = np.float16(6e-8).reshape(1).view(np.uint8)  # a scale of float16's least
    raw = torch.from_numpy(blocks.reshape(40, -1))
    expected = torch.from_numpy(gguf.quants.dequantize(raw.numpy(), qtype))
    assert torch.equal(dequantize_blocks(raw, kind), expected)
    int8, requantized = gguf_module.int8_parts(raw, kind), quantize(expected, QuantSpec("int8"))
    assert all(torch.equal(int8[name], requantized[name]) for name in ("qweight", "scales"))
    direct = (gguf_module.DIRECT_INT4 | gguf_module.DIRECT_INT5).get(kind)
    if direct:  # re-laid as int4 (int5) parts, every value the gguf package's; the same bytes by C++ and by PyTorch
        re_lay = gguf_module.q4k_parts if kind.endswith("_K") else gguf_module.q4_parts
        re_laid = re_lay(raw, kind)
        assert {name: (tuple(t.shape), t.dtype) for name, t in re_laid.items()} == packed_shapes(40, 2048, direct)
        assert torch.equal(dequantize(re_laid, direct), expected)
        if built:
            monkeypatch.setattr(vnni, "available", lambda: not kernels)
            other = re_lay(raw, kind)
            assert all(torch.equal(re_laid[name], other[name]) for name in re_laid)


def test_experts_without_a_batched_kernel_load_and_run_one_by_one(tmp_path, monkeypatch):
    """Where the backend has no expert-batched kernel (a CPU with neither AVX2 nor AVX-512; a shape its kernels
    do not take), a MoE still loads in bfloat16 (its experts' parts let go of as each is repacked; the loader
    once failed there) and runs its experts one by one, with the logits of the batched kernel's calls."""
    from lilmistral.quant import cpu

    make_hf_model(tmp_path / "hf", "mixtral", hidden_size=256, intermediate_size=512, **MIXTRAL)
    batched = lilmistral.load(tmp_path / "hf", quant="int4")
    monkeypatch.setattr(cpu, "expert_gemv", lambda kernels: None)
    one_by_one = lilmistral.load(tmp_path / "hf", quant="int4")
    experts = [[m for m in llm.model.modules() if isinstance(m, QuantExperts)] for llm in (batched, one_by_one)]
    assert all(m.batched or not vnni.available() for m in experts[0])
    assert experts[1] and all(m.batched is None and m[0].w1.qweight is None for m in experts[1])
    for ids in (list(range(10, 40)), [17], [99]):  # a prompt (the loop in both), then tokens alone (batched)
        assert torch.equal(one_by_one.forward(ids), batched.forward(ids))


def test_a_models_recommended_sampling_is_where_generation_starts(hf_models, tmp_path, monkeypatch, capsys):
    """A GGUF's general.sampling.* keys (llama.cpp's) and a HF folder's generation_config.json say how the model
    wants to be sampled: `load` starts there (kept through `convert`), under the caller's own options; `show` says
    so. They are untrusted: a value of the wrong type or out of range is left out with a warning, and a damaged
    generation_config.json does not stop the model."""
    from lilmistral.generate import SamplingParams
    from lilmistral.repl import Chat

    folder, _ = hf_models["mistral"]
    base = lilmistral.load(folder)
    path = tmp_path / "m.gguf"

    def vocab(w) -> None:
        conftest.add_spm_vocab(w)
        w.add_float32("general.sampling.temp", 0.0)
        w.add_int32("general.sampling.top_k", -1)  # llama.cpp's "off"
        w.add_float32("general.sampling.top_p", 0.95)  # as float32: 0.949999988
        w.add_float32("general.sampling.penalty_repeat", -1.0)  # out of range
        w.add_string("general.sampling.penalty_last_n", "64")  # of the wrong type

    write_gguf(path, base.model.state_dict(), base.args, qtype="Q4_0", vocab=vocab)
    recommended = {"temperature": 0.0, "top_k": 0, "top_p": 0.95}
    with pytest.warns(UserWarning, match=r"recommended (repeat_penalty -1.0|repeat_last_n '64') is not") as caught:
        llm = lilmistral.load(path)
    assert llm.sampling_defaults == recommended and len(caught) == 2
    used = []
    monkeypatch.setattr(SamplingParams, "validate", lambda self: used.append(self))
    ids = list(range(5, 15))
    assert list(llm.generate(ids, max_tokens=6)) == list(llm.generate(ids, max_tokens=6, temperature=0, seed=1))
    list(llm.chat([{"role": "user", "content": "hi"}], max_tokens=2, top_p=0.5))
    assert [(p.temperature, p.top_k, p.top_p) for p in used] == [(0.0, 0, 0.95)] * 2 + [(0.0, 0, 0.5)]
    assert Chat(llm).params == SamplingParams(**recommended)
    monkeypatch.undo()

    with pytest.warns(UserWarning):
        out = convert(path, tmp_path / "converted", "int4")
    assert json.loads((out / "manifest.json").read_text())["sampling"] == recommended
    assert lilmistral.load(out).sampling_defaults == recommended
    capsys.readouterr()
    assert main(["show", str(out)]) == 0
    assert ("sampling      temperature 0.0 (the model's), top_k 0 (the model's), top_p 0.95 (the model's), "
            "repeat_penalty 1.1, repeat_last_n 64") in capsys.readouterr().out

    hf = tmp_path / "hf"
    shutil.copytree(folder, hf)
    (hf / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.9}))
    assert lilmistral.load(hf).sampling_defaults == {"temperature": 0.6, "top_p": 0.9}
    (hf / "generation_config.json").write_text("{")
    with pytest.warns(UserWarning, match="generation_config.json: cannot read JSON"):
        assert lilmistral.load(hf).sampling_defaults == {}


def test_a_gguf_answer_ends_at_any_of_llama_cpps_end_of_generation_tokens(hf_models, tmp_path):
    """A ChatML fine-tune's GGUF may name <|endoftext|> its eos and close its turns with <|im_end|>: llama.cpp
    stops at either (and at eot and eom ids), by their text; so does lilmistral. Before, only eos and eot ids: such
    a model went on to write the user's next turn."""
    from lilmistral.convert.gguf import gguf_tokenizer

    def vocab(w) -> None:
        w.add_tokenizer_model("gpt2")
        w.add_token_list(["a", "b", "ab", "<|endoftext|>", "<|im_end|>", "<|eom_id|>", "c"])
        w.add_token_types([1, 1, 1, 3, 3, 3, 1])
        w.add_token_merges(["a b"])
        w.add_eos_token_id(3)
        w.add_uint32("tokenizer.ggml.eom_token_id", 5)

    base = lilmistral.load(hf_models["mistral"][0])
    path = tmp_path / "chatml.gguf"
    write_gguf(path, base.model.state_dict(), base.args, vocab=vocab)
    assert gguf_tokenizer(GGUFSource(path)).eos_ids == {3, 4, 5}
    assert gguf_tokenizer(GGUFSource(conftest.smollm2_gguf())).eos_ids == {0, 2}  # <|endoftext|>, <|im_end|>
