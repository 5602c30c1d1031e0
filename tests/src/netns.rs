//! Network namespace topologies (client / proxy / home) and traffic helpers.
