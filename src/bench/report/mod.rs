//! The results written to files: JSON ([`json`]), CSV ([`csv`]) and an SVG plot
//! ([`plot`]).

pub mod csv;
pub mod json;
pub mod plot;
