"""The top-level request fields each inference route accepts: OpenAI's and the engines' own.

OpenAI answers a field it does not define with 400 ``Unrecognized request argument supplied``;
the engines do not (vLLM accepts and ignores extra fields, llama-cpp-python drops them), so a
misspelt ``max_token`` or ``temprature`` would pass silently. The gateway refuses what neither
OpenAI nor an engine it runs defines, and passes every engine's documented extension, whichever
engine serves the model (a fallback or a split may cross engines).

Sources, read from the installed packages: OpenAI's from the ``openai`` SDK's request types
(``completion_create_params``, ``embedding_create_params``; a test checks the SDK's current
fields are all here); vLLM 0.32's ``ChatCompletionRequest``, ``CompletionRequest`` and
``EmbeddingCompletionRequest`` / ``EmbeddingChatRequest`` fields, with the ``guided_*`` fields of
earlier versions; llama-cpp-python 0.3's server request models; SGLang 0.5.23's
``entrypoints/openai/protocol.py`` (the SGLang tier checks the installed one's fields are here).
"""

from __future__ import annotations

__all__ = ["GATEWAY_ONLY", "KNOWN_FIELDS"]

#: Fields engines read that only the gateway may set: ``kv_transfer_params`` drives a
#: disaggregated model's prefill and decode (``disagg``); a client's would point an engine's KV
#: pull at any host it names. A client sending one is answered 400.
GATEWAY_ONLY = frozenset({"kv_transfer_params"})

_OPENAI_CHAT = {
    "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs",
    "max_completion_tokens", "max_tokens", "messages", "metadata", "modalities", "model",
    "moderation", "n", "parallel_tool_calls", "prediction", "presence_penalty",
    "prompt_cache_key", "prompt_cache_options", "prompt_cache_retention", "reasoning_effort",
    "response_format", "safety_identifier", "seed", "service_tier", "stop", "store", "stream",
    "stream_options", "temperature", "tool_choice", "tools", "top_logprobs", "top_p", "user",
    "verbosity", "web_search_options",
}  # fmt: skip
_OPENAI_COMPLETION = {
    "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "model", "n",
    "presence_penalty", "prompt", "seed", "stop", "stream", "stream_options", "suffix",
    "temperature", "top_p", "user",
}  # fmt: skip
_OPENAI_EMBEDDINGS = {"dimensions", "encoding_format", "input", "model", "user"}
#: Read by the gateway on either generation route (checked, and reserved by).
_GATEWAY = {"max_completion_tokens"}

#: Sampling and output extensions vLLM shares between chat and completions (not those in
#: ``GATEWAY_ONLY``).
_VLLM_SAMPLING = {
    "add_special_tokens", "allowed_token_ids", "bad_words", "cache_salt", "ec_transfer_params",
    "ignore_eos", "include_stop_str_in_output", "length_penalty",
    "logprob_token_ids", "min_p", "min_tokens", "mm_payload", "priority", "prompt_logprobs",
    "repetition_detection", "repetition_penalty", "request_id", "return_mm_kwargs",
    "return_token_ids", "return_token_offsets", "return_tokens_as_token_ids",
    "routed_experts_prompt_start", "session_id", "skip_special_tokens",
    "spaces_between_special_tokens", "stop_token_ids", "stream_interval", "structured_outputs",
    "thinking_token_budget", "top_k", "truncate_prompt_tokens", "truncation_side",
    "use_beam_search", "vllm_xargs", "watermarking",
    # earlier versions
    "guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_decoding_backend",
    "guided_whitespace_pattern", "logits_processors",
}  # fmt: skip
_VLLM_CHAT = {
    "add_generation_prompt", "chat_template", "chat_template_kwargs", "continue_final_message",
    "documents", "echo", "include_reasoning", "media_io_kwargs", "mm_processor_kwargs",
    "return_prompt_text",
}  # fmt: skip
_VLLM_COMPLETION = {"prompt_embeds", "response_format"}
_VLLM_EMBEDDINGS = {
    "add_generation_prompt", "add_special_tokens", "cache_salt", "chat_template",
    "chat_template_kwargs", "continue_final_message", "embed_dtype", "endianness",
    "media_io_kwargs", "messages", "mm_processor_kwargs", "padding", "priority", "request_id",
    "truncate_prompt_tokens", "truncation_side", "use_activation",
}  # fmt: skip

_LLAMA_CPP = {
    "grammar", "logit_bias_type", "min_p", "min_tokens", "mirostat_eta", "mirostat_mode",
    "mirostat_tau", "repeat_penalty", "top_k",
}  # fmt: skip

_SGLANG = {
    "bootstrap_host", "bootstrap_port", "bootstrap_room", "cache_salt", "custom_labels",
    "custom_logit_processor", "custom_params", "data_parallel_rank", "disagg_prefill_dp_rank",
    "ebnf", "extra_key", "ignore_eos", "images_config", "json_schema", "lora_path", "min_p",
    "min_tokens", "ngram_corpus_id", "no_stop_trim", "priority", "regex", "repetition_penalty",
    "return_cached_tokens_details", "return_hidden_states", "return_routed_experts",
    "return_token_ids", "rid", "routed_dp_rank", "routed_experts_start_len", "session_id",
    "session_params", "skip_special_tokens", "stop_regex", "stop_token_ids", "top_k",
    "mm_processor_kwargs", "return_spec_tokens_details", "watermark",
}  # fmt: skip
_SGLANG_CHAT = {
    "chat_template_kwargs", "continue_final_message", "input_ids", "max_dynamic_patch",
    "min_dynamic_patch", "reasoning", "return_meta_info", "return_prompt_token_ids",
    "separate_reasoning", "stream_reasoning", "task", "use_audio_in_video",
    "return_flat_raw_output_top_logprobs", "return_flat_raw_top_logprobs_b64",
    "return_input_ids_in_sglext", "return_output_ids_in_sglext", "return_sampling_mask",
    "sampling_logprobs_mode", "thinking", "video_config",
}  # fmt: skip
_SGLANG_EMBEDDINGS = {
    "embed_override_token_id", "embed_overrides", "extra_key", "lora_path", "priority", "rid",
}  # fmt: skip

#: Route → every top-level field a body for it may carry.
KNOWN_FIELDS: dict[str, frozenset[str]] = {
    "/v1/chat/completions": frozenset(
        _OPENAI_CHAT | _VLLM_SAMPLING | _VLLM_CHAT | _LLAMA_CPP | _SGLANG | _SGLANG_CHAT
    ),
    "/v1/completions": frozenset(
        _OPENAI_COMPLETION | _GATEWAY | _VLLM_SAMPLING | _VLLM_COMPLETION | _LLAMA_CPP | _SGLANG
    ),
    "/v1/embeddings": frozenset(_OPENAI_EMBEDDINGS | _VLLM_EMBEDDINGS | _SGLANG_EMBEDDINGS),
}
