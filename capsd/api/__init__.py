"""The OpenAI-compatible HTTP API (docs/design.md#the-openai-compatible-api): `server` serves it on
the supervisor's event loop, `responses` shapes what it answers (pure), `decode` is the small
process that decodes one upload."""
