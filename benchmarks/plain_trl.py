"""The comparison baselines: DPO with trl + peft directly, no dist-dpo code. benchmarks/throughput.py times it.

    tutorial       the tutorial's recipe verbatim: LoRA r8/alpha 32/dropout 0.1 on q,v; 4 pairs x 4 accumulation;
                   gradient checkpointing; lr 1e-5; beta 0.1; max_length 1024; bf16 (QLoRA: NF4 + double quant,
                   bf16 compute, paged_adamw_8bit - the tutorial's part 2)
    best           the fastest plain-trl flags found: no checkpointing, 16 pairs x 1, use_liger_kernel when installed
    best-precompute  best + precompute_ref_log_probs (trl hashes the weights, then runs a reference pass first)
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

RECIPES = {
    "tutorial": dict(per_device_train_batch_size=4, gradient_accumulation_steps=4, gradient_checkpointing=True),
    "best": dict(per_device_train_batch_size=16, gradient_accumulation_steps=1, gradient_checkpointing=False),
    "best-precompute": dict(per_device_train_batch_size=16, gradient_accumulation_steps=1,
                            gradient_checkpointing=False, precompute_ref_log_probs=True, precompute_ref_batch_size=32),
}


def run(model_path: str, data_dir: str, system_prompt: str, recipe: str, qlora: bool, max_length: int,
        output_dir: str, overrides: dict | None = None) -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import DPOConfig, DPOTrainer

    on_gpu = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    quant = None
    if qlora:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch.bfloat16 if on_gpu else torch.float32, quantization_config=quant,
        device_map={"": local_rank} if qlora else None)
    model.config.use_cache = False

    rows = [json.loads(line) for line in (Path(data_dir) / "train.jsonl").read_text().splitlines() if line.strip()]
    train = Dataset.from_list([{
        "prompt": [{"role": "system", "content": system_prompt}, {"role": "user", "content": r["prompt"]}],
        "chosen": [{"role": "assistant", "content": r["chosen"]}],
        "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])

    kwargs = dict(RECIPES[recipe])
    if recipe != "tutorial" and importlib.util.find_spec("liger_kernel") is not None and on_gpu:
        kwargs["use_liger_kernel"] = True
    kwargs.update(overrides or {})
    args = DPOConfig(
        output_dir=output_dir, num_train_epochs=1, learning_rate=1e-5, beta=0.1, max_length=max_length,
        optim="paged_adamw_8bit" if qlora else "adamw_torch", bf16=on_gpu, use_cpu=not on_gpu, logging_steps=10,
        save_strategy="no", report_to=[], ddp_find_unused_parameters=False, seed=42, **kwargs)
    peft_config = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                             task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                         peft_config=peft_config)
    trainer.train()
