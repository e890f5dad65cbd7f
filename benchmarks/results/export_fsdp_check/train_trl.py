#!/usr/bin/env python3
"""qplan 0.1.0: the plan for llama-3.2-1b on h200 (141 GiB), for trl's SFTTrainer.
qplan's estimate for what trl's SFTTrainer runs with this file: peak 9.86 GiB, 18,476 tokens/s (the plan: 17.27 GiB).
Plan settings trl's SFTTrainer cannot express (memory against the plan):
  loss: planned standard, here fused: trl 1.16.0's SFTTrainer always computes the loss in chunks (a fused LM head): less memory than planned (-7.42 GiB)
FSDP2 on 2 GPUs (estimates per GPU, speed for all), the sharding in accelerate_config.yaml, the weights' shards in host memory (CPU offload): gradient_accumulation_steps is per process (2 x 1 = the plan's 2); start it with
  accelerate launch --config_file accelerate_config.yaml train_trl.py --data DATA
(`qplan check` of this file estimates one process holding the whole model: the sharding is the accelerate config's.)
Run:   python train_trl.py --data train.jsonl [--output out] [--max-steps N] [--lr 2e-4]
Data:  a .jsonl file (or a `datasets` directory) of trl's SFT records: "text", or
       "prompt" + "completion", or "messages" (chat).
Check: qplan check train_trl.py --gpu h200
"""
import argparse
import os

# before torch starts: the allocator reads it once
os.environ.setdefault('PYTORCH_CUDA_ALLOC_CONF', 'expandable_segments:True')

MODEL = '/tmp/qplan-export-check/model'


def main(argv=None):
    ap = argparse.ArgumentParser(description="QLoRA fine-tuning with trl's SFTTrainer (exported by qplan)")
    ap.add_argument("--data", required=True, help="training data: .jsonl file or datasets directory")
    ap.add_argument("--output", default="out", help="where the adapter and checkpoints go")
    ap.add_argument("--max-steps", type=int, default=-1, help="optimizer steps (-1: --epochs)")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=2e-4, help="learning rate")
    cli = ap.parse_args(argv)

    import torch
    from datasets import load_dataset, load_from_disk
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type='nf4',
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        MODEL,
        quantization_config=bnb_config,
        dtype=torch.bfloat16,
        attn_implementation='sdpa',
        # FSDP: every process loads and quantizes the model on the host; accelerate
        # gives each GPU its shard as it wraps the blocks
        device_map={"": "cpu"},
    )
    if cuda:  # FSDP CPU offload: the 4-bit layers' constants on this process's GPU
        gpu = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        for module in model.modules():
            if getattr(module, "quant_state", None) is not None:
                module.quant_state.to(gpu)
    peft_config = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules='all-linear',
        bias='none',
        task_type='CAUSAL_LM',
    )
    args = SFTConfig(
        output_dir=cli.output,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        max_length=2048,
        gradient_checkpointing=False,
        optim='adamw_torch',
        bf16=True,
        fp16=False,
        packing=True,
        max_steps=cli.max_steps,
        num_train_epochs=cli.epochs,
        learning_rate=cli.lr,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=not cuda,
    )
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    if os.path.isdir(cli.data):
        dataset = load_from_disk(cli.data)
    else:
        dataset = load_dataset("json", data_files=cli.data, split="train")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset,
                         processing_class=tokenizer, peft_config=peft_config)
    trainer.train()
    trainer.save_model(cli.output)


if __name__ == "__main__":
    main()
