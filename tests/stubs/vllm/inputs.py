def TokensPrompt(prompt_token_ids, multi_modal_data=None):
    out = {"prompt_token_ids": list(prompt_token_ids)}
    if multi_modal_data is not None:
        out["multi_modal_data"] = multi_modal_data
    return out
