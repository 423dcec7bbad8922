"""ViT: sizes, Triton vs PyTorch variants, parity with Hugging Face's and timm's ViT, bad input."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from models import TrainableModel, ViT, create_model, model_config
from tests.helpers.models import assert_grads_close, pair
from tests.helpers.vit import images, tiny
from training.tasks import TASKS
from triformer.testing import assert_close, kernel_device

DEV = kernel_device()

# timm's published parameter counts of vit_{tiny,small,base}_patch16_224
PUBLISHED = {"vit-tiny": 5_717_416, "vit-small": 22_050_664, "vit-base": 86_567_656}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts(name):
    with torch.device("meta"):
        model = create_model(name)
    cfg = model.config
    assert (cfg.image_size, cfg.patch_size, cfg.in_channels, cfg.num_classes) == (224, 16, 3, 1000)
    assert model.num_params(non_embedding=False) == PUBLISHED[name]
    assert model.num_params() == PUBLISHED[name] - 197 * cfg.n_embd - cfg.n_embd


def test_small_image_variants():
    with torch.device("meta"):
        digits, cifar = create_model("vit-digits"), create_model("vit-cifar")
    assert (digits.config.image_size, digits.config.patch_size, digits.config.in_channels,
            digits.config.num_classes) == (8, 2, 1, 10)
    assert (cifar.config.image_size, cifar.config.patch_size, cifar.config.in_channels) == (32, 4, 3)
    assert digits.task == cifar.task == "image"


def test_vit_satisfies_the_training_contract():
    model = ViT(tiny(kernels="torch"))
    assert isinstance(model, TrainableModel) and TASKS[model.task].accuracy
    x, y = images(model.config, 3)
    logits, loss = model(x.cpu(), y.cpu())
    assert logits.shape == (3, 7) and loss.dim() == 0
    assert model.flops_per_example(None) > 6 * model.num_params()


@pytest.mark.parametrize("cfg", [model_config("vit-digits", n_layer=2), tiny(pool="mean")], ids=["digits", "mean"])
def test_triton_matches_torch_float64(cfg):
    ours, ref = pair(cfg)
    x, y = images(cfg, 3)
    y[1] = -100  # ignored
    x = x.transpose(2, 3)  # a non-contiguous view
    logits, loss = ours(x, y)
    logits_ref, loss_ref = ref(x.double(), y)
    assert logits.shape == (3, cfg.num_classes)
    assert_close("logits", logits, logits_ref)
    assert_close("loss", loss, loss_ref)
    loss.backward()
    loss_ref.backward()
    assert_grads_close(ours, ref)


@given(B=st.integers(1, 4), pool=st.sampled_from(["cls", "mean"]), scale=st.sampled_from([1.0, 100.0]),
       smoothing=st.sampled_from([0.0, 0.2]), seed=st.integers(0, 2 ** 16))
def test_property_matches_float64(B, pool, scale, smoothing, seed):
    """Batch sizes, both poolings, label smoothing, and images of large magnitude."""
    cfg = tiny(pool=pool, label_smoothing=smoothing, image_size=6, n_layer=1)
    ours, ref = pair(cfg)
    x, y = images(cfg, B, seed=seed, scale=scale)
    logits, loss = ours(x, y)
    logits_ref, loss_ref = ref(x.double(), y)
    assert_close("logits", logits, logits_ref)
    assert_close("loss", loss, loss_ref)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_soft_targets_match_float64_and_one_hot_equals_class_indices(smoothing):
    """MixUp/CutMix batches carry class probabilities: the loss is sum(-t * log_softmax) against float64, and
    one-hot probabilities give exactly the class-index loss."""
    cfg = tiny(n_layer=1, label_smoothing=smoothing)
    ours, ref = pair(cfg)
    x, y = images(cfg, 4)
    onehot = torch.nn.functional.one_hot(y, cfg.num_classes).float()
    soft = 0.7 * onehot + 0.3 * onehot.flip(0)
    logits, loss = ours(x, soft)
    logits_ref, _ = ref(x.double(), y)
    t = soft.double() * (1 - smoothing) + smoothing / cfg.num_classes
    loss_ref = -(t * torch.log_softmax(logits_ref, -1)).sum(-1).mean()
    assert_close("loss", loss, loss_ref)
    loss.backward()
    loss_ref.backward()
    assert_grads_close(ours, ref)
    torch.testing.assert_close(ours(x, onehot)[1], ours(x, y)[1], rtol=1e-5, atol=1e-6)


def test_dropout_applies_in_training_only():
    cfg = tiny(dropout=0.3)
    model = ViT(cfg).to(DEV)
    x, _ = images(cfg, 2)
    eval_logits = model.eval()(x)[0]
    assert not torch.allclose(model.train()(x)[0], eval_logits)
    plain = ViT(tiny()).to(DEV).eval()
    plain.load_state_dict(model.state_dict())
    assert torch.equal(plain(x)[0], eval_logits)


# ---------------------------------------------------------------------------------------------------------
# parity with other implementations (their models in float64, ours with Triton kernels in fp32)

def check_parity(ours, theirs_logits_fn, cfg):
    x, _ = images(cfg, 2, seed=5)
    with torch.no_grad():
        expected = theirs_logits_fn(x.cpu().double())
    assert_close("logits", ours(x)[0], expected)


def randomize_vectors_(model):
    """Random norm affines and biases, so that every mapped tensor matters."""
    torch.manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.1)


def test_matches_huggingface_vit():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=80,
                                    image_size=10, patch_size=2, num_channels=3, num_labels=7, layer_norm_eps=1e-6,
                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(3)
    hf = transformers.ViTForImageClassification(config).eval()
    randomize_vectors_(hf)
    ours = ViT.from_huggingface(hf).to(DEV)
    assert ours.config.mlp_hidden == 80 and ours.config.pool == "cls"
    check_parity(ours, lambda x: hf.double()(pixel_values=x).logits, ours.config)


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_matches_timm(pool):
    # timm imports torchvision, which has no build matching this CPU torch: skipped where it cannot import
    vision_transformer = pytest.importorskip("timm.models.vision_transformer")
    torch.manual_seed(3)
    tm = vision_transformer.VisionTransformer(img_size=10, patch_size=2, in_chans=3, num_classes=7, embed_dim=48,
                                              depth=2, num_heads=3, mlp_ratio=5 / 3, global_pool=pool).eval()
    randomize_vectors_(tm)
    ours = ViT.from_timm(tm).to(DEV)
    assert ours.config.pool == ("cls" if pool == "token" else "mean") and ours.config.mlp_hidden == 80
    check_parity(ours, lambda x: tm.double()(x), ours.config)


# ---------------------------------------------------------------------------------------------------------
# bad input

@pytest.mark.parametrize("overrides,match", [
    (dict(n_embd=50), "divisible by n_head"),
    (dict(image_size=11), "divisible by patch_size"),
    (dict(pool="max"), "pool must be one of"),
    (dict(n_kv_head=1), "n_kv_head must equal n_head"),
])
def test_bad_configs(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny(**overrides)


def test_bad_inputs():
    cfg = tiny(n_layer=1)
    model = ViT(cfg).to(DEV)
    x, y = images(cfg, 2)
    with pytest.raises(ValueError, match=r"images must be \[B, 3, 10, 10\]"):
        model(x[:, :2])
    with pytest.raises(TypeError, match="images must be a float tensor"):
        model(x.long())
    with pytest.raises(ValueError, match="targets must be int64/int32 class indices of shape"):
        model(x, y[:1])
    with pytest.raises(ValueError, match=r"or float class probabilities of shape \[2, 7\]"):
        model(x, torch.ones(2, 6, device=x.device) / 6)


def test_huggingface_config_that_disagrees_with_its_weights_is_refused():
    transformers = pytest.importorskip("transformers")
    hf = transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=4, patch_size=2,
        num_channels=1, num_labels=3))
    hf.config.num_hidden_layers = 1
    with pytest.raises(ValueError, match=r"no place for \(vit\.(layers|encoder\.layer)\.1\."):
        ViT.from_huggingface(hf, kernels="torch")
    hf.config.num_hidden_layers, hf.config.num_labels = 2, 5
    with pytest.raises(ValueError, match="do not fit the architecture of its config"):
        ViT.from_huggingface(hf, kernels="torch")
