"""Config keys of FlowSeg.

Mask2Former's key names are kept where the concept is the same (``MODEL.MASK_FORMER``,
``MODEL.SEM_SEG_HEAD``, ``INPUT.IMAGE_SIZE`` ...) so that Mask2Former users find them where
they expect. Everything FlowSeg adds lives under ``MODEL.FLOWSEG``, ``MODEL.SAM_VIT``,
``MODEL.LLM``, ``MODEL.VANILLA_ENCODER``. Defaults are the paper's values (FlowSeg §4.1,
A.1–A.3) where the paper gives them.
"""

from detectron2.config import CfgNode as CN


def llm_configured(cfg: CN) -> bool:
    """True when the config names an LLM (a local checkpoint or a config to build one)."""
    return bool(cfg.MODEL.LLM.PATH or cfg.MODEL.LLM.CONFIG)


def uses_class_head(cfg: CN) -> bool:
    """True for the stage-1 segmentor: generic mode without an LLM, so the decoder classifies with
    a learnable head over ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` (otherwise classes are conditions)."""
    return cfg.MODEL.FLOWSEG.MODE == "generic" and not llm_configured(cfg)


def add_flowseg_config(cfg: CN) -> CN:
    """Add every config key FlowSeg uses to ``cfg`` (in place) and return it."""
    add_input_config(cfg)
    add_solver_config(cfg)
    add_test_config(cfg)
    add_sam_vit_config(cfg)
    add_pixel_decoder_config(cfg)
    add_mask_former_config(cfg)
    add_bsf_config(cfg)
    add_llm_config(cfg)
    add_vanilla_encoder_config(cfg)
    add_connector_config(cfg)
    add_language_scaffold_config(cfg)
    return cfg


def add_connector_config(cfg: CN) -> CN:
    """Keys of the paper's scaffold (X-SAM's) segmentor, each a choice between it and this
    project's earlier form (the defaults, which the tiny and synthetic CPU configs keep); the
    paper configs (``configs/Base-FlowSeg.yaml``) select X-SAM's."""
    # "connector": SAM-ViT block outputs (CONNECTOR.LAYERS) through X-SAM's conv connector with
    # pixel shuffle -> p3, p4, p5 (1/8, 1/16, 1/32); SAM's neck carried, unused.
    # "pyramid": ViTDet's SimpleFeaturePyramid on the last block (SCALE_FACTORS -> p2..p5).
    cfg.MODEL.SAM_VIT.FEATURE_PATH = "pyramid"
    cfg.MODEL.SAM_VIT.CONNECTOR = CN()
    cfg.MODEL.SAM_VIT.CONNECTOR.LAYERS = []  # 1-indexed blocks; [] = the last global-attention ones
    cfg.MODEL.SAM_VIT.CONNECTOR.SCALE_FACTORS = [2.0, 1.0, 0.5]  # pixel shuffle -> strides 8, 16, 32
    cfg.MODEL.SAM_VIT.CONNECTOR.HIDDEN_DIM = 512
    # True: the backbone also outputs "sam_tokens" [B, C, H/16, W/16], the output of block
    # SAM_TOKENS_LAYER (1-indexed; 0 = the penultimate block, X-SAM's hidden_states[-2])
    cfg.MODEL.SAM_VIT.RETURN_SAM_TOKENS = False
    cfg.MODEL.SAM_VIT.SAM_TOKENS_LAYER = 0
    # FPN levels of the pixel decoder: -1 = Mask2Former's rule (one per octave between the
    # encoder's finest stride and COMMON_STRIDE); n >= 0 = the n finest inputs, the encoder's
    # own finest level included (X-SAM: 1 on the 1/8 map, mask features at 1/8)
    cfg.MODEL.SEM_SEG_HEAD.NUM_FPN_LEVELS = -1
    # Condition logits of the decoder (referring mode, generic mode with an LLM):
    # "background": exp(s) * cos(LN(q), c) over [C; a learned background embedding], clamped to
    #   +-50; the background column is the no-object class (X-SAM's head);
    # "projected": exp(s) * cos(proj(LN(q)), c) over C plus a linear no-object logit of the query.
    cfg.MODEL.FLOWSEG.CONDITION_LOGITS = "projected"
    # Output stride BAR runs at: mask logits and pixel features are upsampled (bilinear) from the
    # mask features' stride (COMMON_STRIDE) to it; 0 = the mask features' own stride.
    cfg.MODEL.FLOWSEG.BAR.STRIDE = 0
    return cfg


def add_language_scaffold_config(cfg: CN) -> CN:
    """Keys of the language side of X-SAM's scaffold (prompts, image tokens, data protocol).

    The defaults keep FlowSeg's original behaviour; the paper configs opt in to X-SAM's.
    """
    # "flowseg": one fixed template per task through the tokenizer's chat template;
    # "xsam": X-SAM's question/answer templates (chosen deterministically, see
    # flowseg.modeling.language.templates), packed expressions as one turn each, and a ChatML
    # dialogue without system message rendered independently of the tokenizer's template.
    cfg.MODEL.LLM.PROMPT_STYLE = "flowseg"
    # dialogue markers of the "xsam" style: "chatml" (Qwen3) or "phi3" (X-SAM's released Phi-3-mini)
    cfg.MODEL.LLM.CHAT_FORMAT = "chatml"
    # 0: the vision tower's last_hidden_state (after its final LayerNorm); k < 0: hidden_states[k]
    # (no final norm). X-SAM feeds SigLIP2's penultimate layer (-2) to phi_vis.
    cfg.MODEL.VANILLA_ENCODER.FEATURE_LAYER = 0
    # Dual-encoder image tokens (X-SAM): the SAM-ViT's "sam_tokens" output (the second-to-last
    # block's output) is pixel-unshuffled by 1 / DOWNSAMPLE (0.5: 2x2 -> 4x the channels) and
    # projected to the LLM width; these tokens follow the vanilla encoder's at <image>.
    cfg.MODEL.LLM.SAM_TOKENS = CN()
    cfg.MODEL.LLM.SAM_TOKENS.ENABLED = False
    cfg.MODEL.LLM.SAM_TOKENS.DOWNSAMPLE = 0.5
    # Referring data protocol. "packed" with PACK_EXPRESSIONS: "random" draws k ~ U{1..K} objects
    # of an image with a random expression each; "all_objects" (X-SAM) takes every object of the
    # image, K per sample (chunks), one random expression each.
    cfg.INPUT.PACK_MODE = "random"
    return cfg


def add_input_config(cfg: CN) -> CN:
    """Input and data-loading keys (mappers, referring sampling, mixed-task data, bad samples)."""
    cfg.INPUT.DATASET_MAPPER_NAME = "coco_panoptic_lsj"
    cfg.INPUT.IMAGE_SIZE = 1024  # large-scale jitter output size (square, padded)
    cfg.INPUT.MIN_SCALE = 0.1
    cfg.INPUT.MAX_SCALE = 2.0
    # Referring / reasoning: resize the long side to IMAGE_SIZE (SAM's protocol), pad in the model.
    cfg.INPUT.REFER_RANDOM_FLIP = False  # left/right words make flipping unsafe by default
    # Training: expressions drawn per referring/reasoning image (LISA-style). > 1 groups the data
    # set by image; one batch then holds IMS_PER_BATCH images x this many expressions, sharing one
    # image encoding (SAM-ViT + pixel decoder) per image. 1 = one expression per sample.
    cfg.INPUT.EXPRESSIONS_PER_IMAGE = 1
    # With EXPRESSIONS_PER_IMAGE = K > 1: pack k ~ uniform{1..K} expressions of different objects
    # into ONE prompt (a <p> span = a condition each) instead of K samples; evaluation stays one
    # expression per prompt.
    cfg.INPUT.PACK_EXPRESSIONS = False

    cfg.INPUT.CONVERSATION_MAX_TURNS = 1  # conversation mapper: human/gpt pairs kept (<= 0: all)

    cfg.DATALOADER.TASK_RATIOS = []  # stage-3 mixed data: one ratio per entry of DATASETS.TRAIN
    # a sample whose input cannot be used (unreadable image, prompt too long, ...): "error" stops
    # with its file / ids, "skip" leaves it out with a warning and lists it (flowseg.utils.bad_samples)
    cfg.DATALOADER.ON_BAD_SAMPLE = "error"
    return cfg


def add_solver_config(cfg: CN) -> CN:
    """Optimizer groups and checkpoint contents."""
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    cfg.SOLVER.LLM_MULTIPLIER = 1.0
    cfg.SOLVER.VANILLA_ENCODER_MULTIPLIER = 1.0  # condition_head.vision_encoder.* (X-SAM stage 3: 0.1)
    # autocast dtype of SOLVER.AMP (Detectron2 has only ENABLED): X-SAM and the paper train in
    # bfloat16, which needs no loss scaling; float16 keeps Detectron2's GradScaler
    cfg.SOLVER.AMP.PRECISION = "bfloat16"
    # Periodic / final checkpoints hold what training changes plus the names and fingerprints of the
    # frozen weights and the files they come from (MODEL.LLM.PATH, the MODEL.WEIGHTS the run started
    # from, ...); loading one rebuilds the full model. False: full state dicts (~10 GB at paper size).
    cfg.SOLVER.CHECKPOINT_TRAINABLE_ONLY = True
    # Multi-process engine (flowseg.engine.fsdp): "ddp" replicates the model; "fsdp" shards weights,
    # gradients and optimizer state with FSDP2 (for full fine-tuning at paper size). False keeps the
    # gathered weights from forward to backward (ZeRO-2-like), True frees them (ZeRO-3-like).
    cfg.MODEL.DISTRIBUTED = CN()
    cfg.MODEL.DISTRIBUTED.ENGINE = "ddp"
    cfg.MODEL.DISTRIBUTED.RESHARD_AFTER_FORWARD = False
    return cfg


def add_test_config(cfg: CN) -> CN:
    """Evaluation: metrics files, shared image features, candidate masks."""
    cfg.TEST.SAVE_METRICS_JSON = True
    # Referring evaluation: image encoders (and the LLM's image prefix) run once per image and are
    # shared by its expressions (flowseg.engine.shared_features); outputs equal the per-expression
    # loop up to float reduction order.
    cfg.TEST.SHARED_IMAGE_FEATURES = True
    cfg.TEST.SHARED_LLM_PREFIX = True
    cfg.TEST.EXPRESSIONS_PER_PASS = 16  # K of one LLM + decoder pass (memory bound)
    # Referring inference: also return every query's mask at the original size
    # (ref_seg["candidates"], [Q, H, W] bool) for the oracle cIoU / gIoU of the evaluator and
    # tools/analysis/oracle_vs_selected.py. Off: only the selected mask(s) are upsampled (at 1024^2
    # the candidates cost Q x 1024^2 floats per sample before thresholding).
    cfg.TEST.RETURN_CANDIDATES = False
    # --eval-only refuses a model whose parts stay at their initialisation (no weights in
    # MODEL.WEIGHTS, no pretrained file): True evaluates anyway, with a warning naming them.
    cfg.TEST.ALLOW_UNTRAINED_PARTS = False
    return cfg


def add_sam_vit_config(cfg: CN) -> CN:
    """Segmentation encoder (SAM-ViT)."""
    cfg.MODEL.SAM_VIT = CN()
    cfg.MODEL.SAM_VIT.PRESET = "L"  # "B", "L", "H" (official SAM sizes) or "tiny" (tests)
    cfg.MODEL.SAM_VIT.IMG_SIZE = 1024
    cfg.MODEL.SAM_VIT.PATCH_SIZE = 16
    # 0 / empty = take the value from the preset
    cfg.MODEL.SAM_VIT.EMBED_DIM = 0
    cfg.MODEL.SAM_VIT.DEPTH = 0
    cfg.MODEL.SAM_VIT.NUM_HEADS = 0
    cfg.MODEL.SAM_VIT.GLOBAL_ATTN_INDEXES = []
    cfg.MODEL.SAM_VIT.WINDOW_SIZE = 0  # 0 = preset's (14 for B/L/H)
    cfg.MODEL.SAM_VIT.MLP_RATIO = 4.0  # SAM's; tiny test models mirroring other checkpoints differ
    # >0: pad every input to this square, as SAM does (1024); 0: pad to a multiple of 32 only and
    # let the ViT resample its position table to the actual token grid
    cfg.MODEL.SAM_VIT.SQUARE_PAD = 0
    cfg.MODEL.SAM_VIT.DROP_PATH_RATE = 0.0
    cfg.MODEL.SAM_VIT.OUT_CHANNELS = 256  # SAM's neck width = SimpleFeaturePyramid channels
    cfg.MODEL.SAM_VIT.SCALE_FACTORS = [4.0, 2.0, 1.0, 0.5]  # -> p2..p5 (1/4 .. 1/32)
    cfg.MODEL.SAM_VIT.USE_ACT_CHECKPOINT = False
    cfg.MODEL.SAM_VIT.FREEZE = False
    # True: convolutional patch embedding (3x3 stride-2 convs) instead of SAM's linear one; for
    # ViTs trained from scratch (synthetic configs), incompatible with SAM checkpoints
    cfg.MODEL.SAM_VIT.CONV_STEM = False
    cfg.MODEL.SAM_VIT.CHECKPOINT = ""  # official SAM .pth (image_encoder.*) loaded at build time
    return cfg


def add_pixel_decoder_config(cfg: CN) -> CN:
    """Pixel decoder (Mask2Former's names)."""
    cfg.MODEL.SEM_SEG_HEAD.NAME = "FlowSegHead"
    cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME = "MSDeformAttnPixelDecoder"
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = [
        "p2",
        "p3",
        "p4",
        "p5",
    ]  # SimpleFeaturePyramid outputs (1/4 .. 1/32)
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES = ["p3", "p4", "p5"]
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 256
    cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = 256
    cfg.MODEL.SEM_SEG_HEAD.NORM = "GN"
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 133
    cfg.MODEL.SEM_SEG_HEAD.COMMON_STRIDE = 4
    cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS = 6
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS = 4
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS = 8
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_DIM_FEEDFORWARD = 1024
    cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE = 255
    return cfg


def add_mask_former_config(cfg: CN) -> CN:
    """Transformer decoder, matching and losses (Mask2Former's names), checkpoint loading."""
    cfg.MODEL.MASK_FORMER = CN()
    cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME = "BSFTransformerDecoder"
    cfg.MODEL.MASK_FORMER.DEEP_SUPERVISION = True
    cfg.MODEL.MASK_FORMER.NO_OBJECT_WEIGHT = 0.1
    cfg.MODEL.MASK_FORMER.CLASS_WEIGHT = 2.0
    # > 0: auxiliary loss classifying every ground-truth segment from its mean 1/4-scale pixel
    # feature (a 1x1 conv on the mask features), class-head models only. Not in the paper: a
    # training aid for segmentors trained from scratch (the synthetic stage 1), whose features
    # otherwise learn shape late (tools/analysis/attribute_probe.py); a pre-trained SAM needs none.
    cfg.MODEL.MASK_FORMER.SEGMENT_AUX_WEIGHT = 0.0
    cfg.MODEL.MASK_FORMER.DICE_WEIGHT = 5.0
    cfg.MODEL.MASK_FORMER.MASK_WEIGHT = 5.0
    cfg.MODEL.MASK_FORMER.NHEADS = 8
    cfg.MODEL.MASK_FORMER.DROPOUT = 0.0
    cfg.MODEL.MASK_FORMER.DIM_FEEDFORWARD = 2048
    cfg.MODEL.MASK_FORMER.DEC_LAYERS = (
        9  # number of decoder layers L (Mask2Former yamls say 10 for the same 9)
    )
    cfg.MODEL.MASK_FORMER.PRE_NORM = False
    cfg.MODEL.MASK_FORMER.HIDDEN_DIM = 256
    cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES = 200
    cfg.MODEL.MASK_FORMER.ENFORCE_INPUT_PROJ = False
    cfg.MODEL.MASK_FORMER.SIZE_DIVISIBILITY = 32
    # point-sampled losses (Mask2Former / PointRend)
    cfg.MODEL.MASK_FORMER.TRAIN_NUM_POINTS = 112 * 112  # 12544
    cfg.MODEL.MASK_FORMER.OVERSAMPLE_RATIO = 3.0
    cfg.MODEL.MASK_FORMER.IMPORTANCE_SAMPLE_RATIO = 0.75

    cfg.MODEL.MASK_FORMER.TEST = CN()
    cfg.MODEL.MASK_FORMER.TEST.SEMANTIC_ON = True
    cfg.MODEL.MASK_FORMER.TEST.INSTANCE_ON = True
    cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = True
    cfg.MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD = 0.8
    cfg.MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD = 0.8
    # "mask2former" or "xsam" (X-SAM's Hugging Face-style merge; see FlowSeg.panoptic_inference)
    cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_MERGE = "mask2former"
    cfg.MODEL.MASK_FORMER.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE = False

    # A FlowSeg checkpoint whose tensor shapes differ from the model's (another config) is an
    # error; True loads the tensors that fit and leaves the others initialised (fine-tuning to
    # another class count or vocabulary). SAM / Mask2Former sources are always loaded partially.
    cfg.MODEL.WEIGHTS_PARTIAL_LOAD = False
    return cfg


def add_bsf_config(cfg: CN) -> CN:
    """FlowSeg's own modules (paper §3.3–3.5): BSF, selection, GRES selection, BAR."""
    cfg.MODEL.FLOWSEG = CN()
    # "generic": learnable class head (paper stage 1, no LLM);
    # "referring": LLM conditions, propose-then-select (RefCOCO/+/g, ReasonSeg).
    cfg.MODEL.FLOWSEG.MODE = "generic"
    cfg.MODEL.FLOWSEG.SEMANTIC_REFINEMENT = True  # SR: eq. 1-4 (semantic cross-attn + fusion gate)
    cfg.MODEL.FLOWSEG.CONDITION_REFINEMENT = True  # CR: eq. 5 (conditions attend to queries)
    # Table 11 control: the semantic cross-attention reads pixel-decoder features instead of C.
    cfg.MODEL.FLOWSEG.VISUAL_CROSS_ATTN_CONTROL = False
    cfg.MODEL.FLOWSEG.ADD_SEG_EMBED_TO_QUERIES = True  # Q(0) <- Q(0) + S
    cfg.MODEL.FLOWSEG.LOGIT_SCALE_INIT = 2.659260036932778  # ln(1/0.07), learnable
    # Initialisation of the BSF modules, which stage 3 adds to a trained segmentor (paper A.3):
    # CR's attention output projection starts at zero, so C(l) = C(0) until training moves it
    # (with xavier init the first update outweighs the LLM condition: cos(C0, C1) ~ 0.5, where the
    # paper's Table 12 has 0.95); the fusion gate's bias sets g at init (0: g ~ 0.5).
    cfg.MODEL.FLOWSEG.CR_ZERO_INIT = True
    cfg.MODEL.FLOWSEG.GATE_BIAS_INIT = 0.0
    # Not in the paper: condition logits also read where each query's predicted mask lies
    # (centre + spread, a zero-initialised projection added to the query embedding). Mask2Former
    # queries carry no location in their content; "leftmost" / "to the left of" need it.
    cfg.MODEL.FLOWSEG.MASK_POSITION_LOGITS = False
    # module-name prefixes allowed to train (stage 2: the two projectors); [] = all, each part
    # still following its own FREEZE switch
    cfg.MODEL.FLOWSEG.TRAINABLE = []
    cfg.MODEL.FLOWSEG.LLM_LOSS_WEIGHT = 1.0  # L = L_llm + L_seg (eq. 8)
    cfg.MODEL.FLOWSEG.SEG_LOSS_WEIGHT = 1.0

    # Expressions with several targets or none (gRefCOCO): samples marked "multi_target" by their
    # loader (ALL_SAMPLES: every referring sample) keep every query with p(condition) >=
    # SCORE_THRESHOLD and answer "no target" when the best query's p(condition) is below
    # NO_TARGET_THRESHOLD (p = softmax over [conditions, no-object]); choose both on val.
    cfg.MODEL.FLOWSEG.GRES = CN()
    cfg.MODEL.FLOWSEG.GRES.SCORE_THRESHOLD = 0.5
    cfg.MODEL.FLOWSEG.GRES.NO_TARGET_THRESHOLD = 0.5
    cfg.MODEL.FLOWSEG.GRES.ALL_SAMPLES = False

    cfg.MODEL.FLOWSEG.BAR = CN()
    cfg.MODEL.FLOWSEG.BAR.NAME = "BoundaryAwareRefiner"
    cfg.MODEL.FLOWSEG.BAR.ENABLED = True
    cfg.MODEL.FLOWSEG.BAR.EPSILON = 0.1  # eq. 6 boundary threshold
    cfg.MODEL.FLOWSEG.BAR.COMPRESS_DIM = 16  # f_comp: 1x1 conv 256 -> 16
    cfg.MODEL.FLOWSEG.BAR.HIDDEN_DIM = 32  # f_refine's intermediate width
    cfg.MODEL.FLOWSEG.BAR.ALPHA_INIT = 0.1
    return cfg


def add_llm_config(cfg: CN) -> CN:
    """Condition head: the LLM, its LoRA adapters."""
    cfg.MODEL.LLM = CN()
    cfg.MODEL.LLM.NAME = "LLMConditionHead"
    cfg.MODEL.LLM.PATH = ""  # local folder of a Hugging Face causal LM (Qwen3-4B in the paper)
    cfg.MODEL.LLM.TOKENIZER_PATH = ""  # defaults to PATH
    cfg.MODEL.LLM.CONFIG = ""  # json of a transformers config: build randomly initialised (tests)
    cfg.MODEL.LLM.TORCH_DTYPE = "float32"  # "bfloat16" for paper-scale runs
    cfg.MODEL.LLM.GRADIENT_CHECKPOINTING = False
    cfg.MODEL.LLM.FREEZE = True  # freeze the base weights (LoRA and new token rows still train)
    cfg.MODEL.LLM.PROJ_HIDDEN_DIM = 0  # phi_llm hidden width (eq. 11); 0 = D_llm
    cfg.MODEL.LLM.MAX_LENGTH = 512
    cfg.MODEL.LLM.LORA = CN()
    cfg.MODEL.LLM.LORA.ENABLED = True
    cfg.MODEL.LLM.LORA.RANK = 8
    cfg.MODEL.LLM.LORA.ALPHA = 16
    cfg.MODEL.LLM.LORA.DROPOUT = 0.05
    cfg.MODEL.LLM.LORA.TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
    return cfg


def add_vanilla_encoder_config(cfg: CN) -> CN:
    """Vanilla vision encoder (SigLIP2) and its projector's input."""
    cfg.MODEL.VANILLA_ENCODER = CN()
    cfg.MODEL.VANILLA_ENCODER.ENABLED = True
    cfg.MODEL.VANILLA_ENCODER.PATH = ""  # local folder of a vision tower (SigLIP2-so400m)
    cfg.MODEL.VANILLA_ENCODER.CONFIG = ""  # json of a transformers vision config (tests)
    cfg.MODEL.VANILLA_ENCODER.IMAGE_SIZE = 384
    cfg.MODEL.VANILLA_ENCODER.PIXEL_MEAN = [127.5, 127.5, 127.5]
    cfg.MODEL.VANILLA_ENCODER.PIXEL_STD = [127.5, 127.5, 127.5]
    cfg.MODEL.VANILLA_ENCODER.FREEZE = True
    # activation checkpointing in the tower (X-SAM's stage 3 fine-tunes SigLIP2 with it)
    cfg.MODEL.VANILLA_ENCODER.GRADIENT_CHECKPOINTING = False
    return cfg
