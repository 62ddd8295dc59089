"""Side-by-side benchmark of a recipe's variants: full model, Skip-Vision and peer methods (docs/method.md "Peers")."""
