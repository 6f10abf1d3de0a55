"""An export loads and generates where the training stack is absent: a fresh Python process in which importing
mesh_megatron, megatron, deepspeed or apex fails as if they were not installed loads the MeSH export (trust_remote_code), its tokenizer, and runs
generate() with the KV cache (a left-padded batch), with num_loops overridden at load."""

import subprocess
import sys
import textwrap

from export_cases import CASES, model_state
from mesh_megatron.config import ModelConfig
from mesh_tools.hf.export import export_model
from mesh_tools.hf.tokenizer import TokenizerSource
from test_export_tokenizer import CORPUS

SCRIPT = textwrap.dedent(
    """
    import sys
    BLOCKED = ("mesh_megatron", "megatron", "deepspeed", "apex", "pretrain", "data_tools")
    class Hide:  # every import finder behaves as if the training stack were not installed
        def __init__(self, finder):
            self.finder = finder
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED or not hasattr(self.finder, "find_spec"):
                return None
            return self.finder.find_spec(name, path, target)
        def __getattr__(self, attr):
            return getattr(self.finder, attr)
    sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
    try:
        import mesh_megatron
        raise SystemExit("mesh_megatron still importable")
    except ImportError:
        pass
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = sys.argv[1]
    tok = AutoTokenizer.from_pretrained(path)
    for loops in (2, 3):
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, num_loops=loops)
        enc = tok(["My lord, the king", "Thou art"], return_tensors="pt", padding=True, padding_side="left")
        out = model.generate(**enc, max_new_tokens=10, do_sample=False)
        assert out.shape[1] == enc["input_ids"].shape[1] + 10, out.shape
        print(type(model).__name__, loops, repr(tok.decode(out[0], skip_special_tokens=True)))
    assert not any(m.split(".")[0] in BLOCKED for m in sys.modules)
    print("OK")
    """
)


def test_export_runs_without_training_stack(single_process, tmp_path):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(input=str(CORPUS), model_prefix=str(tmp_path / "sp"), vocab_size=250, minloglevel=2, pad_id=3, unk_id=0, bos_id=1, eos_id=2)
    c = CASES["mesh"]
    export_model(ModelConfig.from_dict(dict(c)), model_state(c), tmp_path / "export", tokenizer=TokenizerSource("sentencepiece", tmp_path / "sp.model"))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "export")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "MeshGPTForCausalLM 3" in proc.stdout and proc.stdout.strip().endswith("OK")
