"""The router's OpenAI- and Anthropic-compatible HTTPS edge (see server.py)."""
