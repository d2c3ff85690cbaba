"""CPU LoRA training speed: medlora's default path against the reference recipe and TRL's SFTTrainer.

One run measures, on the same machine and the same data, tokens/s (trained tokens, prompt included),
seconds per optimizer step and peak RSS for:

  reference    the specification's settings through plain HF Trainer + PEFT, written here (fp32,
               gradient checkpointing on with use_reentrant=False, batch 1, answer-only labels)
  medlora      medlora.training.recipe.prepare_model + medlora.training.trainer.build_trainer with
               TrainConfig defaults
  medlora_fp32 the same with precision="fp32": medlora's default path on CPUs without native bf16
  medlora_int8 the same with precision="int8": frozen base linears in int8 (oneDNN int8 kernels), LoRA fp32
  trl_tuned    TRL SFTTrainer + PEFT LoRA, completion-only loss, tuned for this CPU: fp32, batch 1,
               max_length = --seq, its default checkpointing
  trl_shipped  the same with SFTConfig defaults (bf16 autocast on, batch 8, max_length 1024,
               gradient checkpointing on)

The model is the Qwen2.5-1.5B architecture with random weights (identical FLOPs, no download); the data
are real MedQuAD rows tokenised with the bundled SmolLM2 tokenizer through medlora.data.encode_frame.
Each contender runs in its own subprocess, so its peak RSS is its own. Results go to
benchmarks/results/train_speed.{md,json}.

    python -m benchmarks.train_speed                    # full size, all five contenders
    python -m benchmarks.train_speed --layers 2         # quick variant for iteration
    python -m benchmarks.train_speed --only reference,medlora --steps 3 --warmup 1 --grad_accum 1

Modules: common (constants), machine (CPU facts, peak FLOP/s), flops (model FLOPs), data (the rows),
contenders (the trainers), child (one contender in a subprocess), runner (the parent's side of it),
report (summaries, ratios, notes, JSON), markdown (the table), cli (options, run, --render).
"""
