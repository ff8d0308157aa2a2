"""DPO of Nanonets-OCR2-3B (a Qwen2.5-VL-3B fine-tune) against its own degenerate outputs.

  python -m jaxdpo.convert hf-to-jax --hf-dir /models/Nanonets-OCR2-3B --out /ckpt/nanonets_ocr2_3b
  python -m jaxdpo.main --config configs/nanonets_ocr2_3b_dpo.py:/ckpt/nanonets_ocr2_3b --workdir gs://... \
      --config.data.train=/data/ocr_prefs.jsonl

The optional argument is a converted checkpoint directory (it also gives the tokenizer); without
it the `nanonets_ocr2_3b` preset is randomly initialised, for memory planning and benchmarks.
The pairs are the DharmaOCR recipe's (DESIGN.md): the model's own looping transcription as
*rejected*, the correct transcription as *chosen*, the same page image on both sides.

Defaults, and why:
  * `model.trainable="language"`: the vision tower and the patch merger (projector) are frozen.
    Degeneration is a decoding behaviour of the language model; both sides of a pair see the
    same image, and the tower was already tuned for documents by the fine-tune, so DPO has
    nothing to teach it. Freezing it keeps that reading intact and drops its optimizer state
    and gradients (0.67B of 3.75B parameters; the planner shows the saving).
  * `dpo.beta=0.1`: TRL's default. The rejected loops are far from the chosen text, so the
    margin grows quickly; a smaller beta would let the policy drift further from the SFT model
    that already transcribes well.
  * `optim.lr=1e-6` with 50 warmup steps and a cosine decay: the usual full-parameter DPO scale
    for 3B models; the run only has to suppress a failure mode, not learn a task.
  * `dpo.reference="model"`: a live frozen copy of the initial policy (the path covered by the
    vision tests). `--config.dpo.reference=cached` precomputes the reference log-probs at start
    and frees the copy's memory.
  * `data.max_length=2048`, `max_prompt_length=1024`: a page image alone is several hundred
    vision tokens, and transcriptions are long.
  * `train.grad_accum=4`: 32 pairs on 8 devices are 4 per device; one per micro-batch keeps
    the planner's estimate at ~38 GiB per device (fits an 80 GB GPU; checked by
    tests/test_nanonets_config.py). A 16 GiB chip needs activation rematerialisation or more
    devices.
"""

from jaxdpo.configs._full_size import full_size_dpo


def get_config(arg=None):
  c = full_size_dpo("qwen2_5_vl", "nanonets_ocr2_3b", arg)
  c.model.trainable = "language"
  c.dpo.beta = 0.1
  c.optim.lr = 1e-6
  c.dpo.reference = "model"
  c.train.grad_accum = 4  # as every full-size config (_full_size.py); kept explicit, it is documented above
  return c
