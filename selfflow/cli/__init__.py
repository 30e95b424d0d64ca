"""Console scripts, one thin module each: parse the command line, build the parts, call the
job below.

May import every layer. No command imports another command: what two share lives in `errors.py`,
`config_help.py` or a layer below.
"""
