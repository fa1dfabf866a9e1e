"""Probe: time per output token of bare HF generate for a Llama-3.2-1B-shaped model at batch
1 and 8, with and without left padding, per attention implementation. Explains sweep TPOTs.

    python bench/batch_probe.py
"""
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main() -> None:
    if not torch.cuda.is_available():
        print("batch_probe: no CUDA: skipped")
        return
    for attn in ("sdpa", "eager"):
        cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                          num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                          tie_word_embeddings=True, pad_token_id=0, eos_token_id=None)
        cfg._attn_implementation = attn
        with torch.device("cuda"):
            m = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
        for bs in (1, 8):
            for padded in (False, True):
                ids = torch.randint(3, 1000, (bs, 200), device="cuda")
                mask = torch.ones_like(ids)
                if padded and bs > 1:
                    for i in range(bs):
                        mask[i, : 10 * i] = 0
                        ids[i, : 10 * i] = 0
                kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=64, min_new_tokens=64,
                          do_sample=False, pad_token_id=0)
                m.generate(**kw)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                m.generate(**kw)
                torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                print(f"{attn:5s} bs={bs} padded={padded!s:5s}: {1000 * dt / 64:.1f} ms per step")
        del m


if __name__ == "__main__":
    main()
