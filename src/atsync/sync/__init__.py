"""(layer under construction; see DESIGN.md §2)"""
