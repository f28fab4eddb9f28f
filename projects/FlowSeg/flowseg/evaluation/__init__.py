# Referring / reasoning evaluators.
