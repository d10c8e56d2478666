"""The unified multiway vision-language transformer."""
