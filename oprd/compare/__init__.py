"""`oprd compare`: objectives side by side on one pair, each at its best learning rate (`runner`), measured by a
callback in each run (`probe`), reported as a table, JSON and a plot (`report`)."""
