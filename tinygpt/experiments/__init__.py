"""Small seeded experiments that train a model and draw what happened (`tinygpt experiment`)."""
