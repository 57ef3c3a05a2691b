"""Load an exported HF folder in vLLM with its real weights (not through sync_weights) and in
transformers; sample from vLLM and print the max |vLLM - transformers| log-prob over the sampled
tokens of an image prompt and a text prompt. Usage: vllm_export_worker.py EXPORT_DIR DATA_DIR"""
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import model as modeling  # noqa: E402
import rollout  # noqa: E402


def main(export_dir, data_dir):
    from transformers import AutoProcessor
    from vllm import LLM

    processor = AutoProcessor.from_pretrained(export_dir)
    rows = data.load_rows(f"{data_dir}@train")
    prompts = [data.build_prompt(rows[0], 0, processor, min_pixels=56 * 56, max_pixels=112 * 112),
               data.build_prompt({"problem": "What is 2 + 3?", "answer": "5"}, 0, processor)]
    engine = LLM(model=export_dir, dtype="float32", enforce_eager=True, kv_cache_memory_bytes=64 << 20,
                 max_model_len=512, limit_mm_per_prompt={"image": 1, "video": 0}, enable_chunked_prefill=False,
                 logprobs_mode="processed_logprobs", seed=0)
    banned = rollout.banned_token_ids(processor.tokenizer)
    results = rollout.generate(engine, prompts, n=3, temperature=1.0, max_tokens=12, seed=0, banned_ids=banned)
    policy = modeling.load_model(export_dir)
    diff = 0.0
    for p, r in zip(prompts, results):
        enc = data.encode_prompt(p, processor)
        samples = [{**enc, "response_ids": ids, "sampler_logp": lps} for ids, lps in r["samples"]]
        batch = data.collate(samples, processor.tokenizer.pad_token_id)
        with torch.no_grad():
            logp = modeling.token_logprobs(policy, batch, banned_ids=banned)
        diff = max(diff, ((logp - batch["sampler_logp"]).abs() * batch["response_mask"]).max().item())
    print(f"max_logp_diff {diff}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
