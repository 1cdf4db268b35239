"""The bundled example recipes and tiny models, shipped in the wheel as `mergecli.bundled`
(see setup.py); `mergecli recipes list` shows them."""
