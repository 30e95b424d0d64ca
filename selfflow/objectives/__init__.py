"""Training losses around the backbone: the flow loss, Self-Flow's representation loss with its EMA
teacher, and the baselines (vanilla flow matching, REPA with an external encoder).

May import models/, flow/, tokenizers/, data/, io/.
"""
