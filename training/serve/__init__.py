"""`orch serve`: an OpenAI-compatible HTTP server for a run, a checkpoint or a Hugging Face folder.

    cli.py        the subcommand's arguments; loads the model and runs uvicorn until SIGINT/SIGTERM
    app.py        the FastAPI app: /v1/models, /v1/completions, /v1/chat/completions, /health, the chat page
    openai_api.py the requests' schemas and checks, the response and chunk shapes, OpenAI's error JSON
    engine.py     continuous batching: every running request shares one KV-cached forward per decode step
    text.py       token ids -> text pieces as they come, ending at a stop string
    precision.py  --dtype bf16|fp32 and --quantize int8 (weight-only, torch's own int8 matmul)
    page.html     the chat page served at / (inline JS, no build step)

The model, tokenizer, chat template and sampling are those of `orch generate|chat` (training/run_folder.py,
training/posttrain/chat.py, model/generate.py): a request served here gets the tokens it would get there.
"""
