"""The answer types a data row may declare (`answer_type`): what the loaders accept and the rewards judge by."""

ANSWER_TYPES = ("integer", "float", "number", "choice", "multi_choice", "math", "expression", "list", "text",
                "free_form")
