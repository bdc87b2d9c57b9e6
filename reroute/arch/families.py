"""The built-in families: one entry each, keyed by ``config.model_type``.

Shared experts (Qwen2-MoE's gated shared expert, DeepSeek's and GLM's shared experts) live outside the router
and are never touched; dense layers (DeepSeek's ``first_k_dense_replace``) have no router and are skipped.
"""

from __future__ import annotations

from reroute.arch import FamilyAdapter, register_family
from reroute.arch.rules import DeepseekV2Softmax, SigmoidGroupLimited, SoftmaxTopK, SparseMixer, TopKSoftmax

_T = "transformers.models"

for _adapter in (
    # softmax -> top-k -> renormalise if norm_topk_prob (False in OlmoeConfig's defaults)
    FamilyAdapter("olmoe", "OLMoE", f"{_T}.olmoe.modeling_olmoe.OlmoeTopKRouter", SoftmaxTopK()),
    FamilyAdapter("qwen2_moe", "Qwen2-MoE", f"{_T}.qwen2_moe.modeling_qwen2_moe.Qwen2MoeTopKRouter", SoftmaxTopK()),
    FamilyAdapter("qwen3_moe", "Qwen3-MoE", f"{_T}.qwen3_moe.modeling_qwen3_moe.Qwen3MoeTopKRouter", SoftmaxTopK()),
    # softmax over float32 logits -> top-k -> always renormalise, weights stay float32
    FamilyAdapter(
        "mixtral",
        "Mixtral",
        f"{_T}.mixtral.modeling_mixtral.MixtralTopKRouter",
        SoftmaxTopK(renorm_attr=None, softmax_on_float_logits=True, cast_to_logits_dtype=False),
    ),
    # top-k on logits (with the router bias) -> softmax over the k
    FamilyAdapter("gpt_oss", "GPT-OSS", f"{_T}.gpt_oss.modeling_gpt_oss.GptOssTopKRouter", TopKSoftmax()),
    FamilyAdapter(
        "granitemoe",
        "GraniteMoE",
        f"{_T}.granitemoe.modeling_granitemoe.GraniteMoeTopKRouter",
        TopKSoftmax(logits_to_float=True),
    ),
    # SparseMixer top-2
    FamilyAdapter("phimoe", "PhiMoE", f"{_T}.phimoe.modeling_phimoe.PhimoeTopKRouter", SparseMixer()),
    # float32 softmax, (group-limited) greedy, routed_scaling_factor
    FamilyAdapter(
        "deepseek_v2", "DeepSeek-V2", f"{_T}.deepseek_v2.modeling_deepseek_v2.DeepseekV2TopkRouter", DeepseekV2Softmax()
    ),
    # sigmoid + e_score_correction_bias + group-limited top-k + renorm + routed_scaling_factor
    FamilyAdapter(
        "deepseek_v3",
        "DeepSeek-V3",
        f"{_T}.deepseek_v3.modeling_deepseek_v3.DeepseekV3TopkRouter",
        SigmoidGroupLimited(),
    ),
    FamilyAdapter("glm4_moe", "GLM-4-MoE", f"{_T}.glm4_moe.modeling_glm4_moe.Glm4MoeTopkRouter", SigmoidGroupLimited()),
):
    register_family(_adapter)
