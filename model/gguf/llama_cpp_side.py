"""llama.cpp reading a GGUF file, for the checks of tests/test_gguf.py and benchmarks/gguf_check.py.

`llama_cpp(python, path, request)` runs this file as a script under `python`, an interpreter that has
llama-cpp-python (which the repo's environment need not have), and returns what llama.cpp computed:

    {"n_ctx": 128, "f32_cache": False,                   (True: keys and values cached in float32, not float16)
     "logits": [[ids], ...],                              -> [T, V] logits of each sequence, evaluated from empty
     "greedy": {"prompts": [[ids], ...], "new_tokens": n}, -> each prompt's n greedy tokens (temperature 0, top-k 1)
     "tokenize": [{"text": s, "special": b, "add_bos": b}, ...]}  -> llama.cpp's ids for each text

As a script it imports nothing of the repo: only the standard library, numpy and llama_cpp.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys


def python_with_llama_cpp() -> str | None:
    """An interpreter that imports llama_cpp: $LLAMA_CPP_PYTHON, else this one if it can, else None."""
    if os.environ.get("LLAMA_CPP_PYTHON"):
        return os.environ["LLAMA_CPP_PYTHON"]
    import importlib.util

    return sys.executable if importlib.util.find_spec("llama_cpp") else None


def llama_cpp(python: str, path: str | pathlib.Path, request: dict, timeout: float = 600) -> dict:
    """What llama.cpp answers to `request` (module docstring) on the GGUF file at `path`."""
    done = subprocess.run(
        [python, __file__, str(path)], input=json.dumps(request), capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise RuntimeError(f"llama.cpp failed on {path}: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout)


def _serve(path: str, request: dict) -> dict:
    import llama_cpp
    import numpy as np

    cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if request.get("f32_cache") else {}
    llm = llama_cpp.Llama(
        model_path=path, n_ctx=request.get("n_ctx", 512), logits_all=True, verbose=False, n_threads=2, seed=0, **cache
    )
    out = {}
    if "logits" in request:
        out["logits"] = []
        for ids in request["logits"]:
            llm.reset()
            llm.eval(ids)
            out["logits"].append(np.asarray(llm.scores[: len(ids)], np.float32).tolist())
    if "greedy" in request:
        g = request["greedy"]
        out["greedy"] = []
        for prompt in g["prompts"]:
            llm.reset()
            tokens = []
            for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
                tokens.append(int(token))
                if len(tokens) == g["new_tokens"]:
                    break
            out["greedy"].append(tokens)
    if "tokenize" in request:
        out["tokenize"] = [
            llm.tokenize(t["text"].encode("utf-8"), add_bos=t.get("add_bos", False), special=t.get("special", False))
            for t in request["tokenize"]
        ]
    return out


if __name__ == "__main__":
    json.dump(_serve(sys.argv[1], json.load(sys.stdin)), sys.stdout)
