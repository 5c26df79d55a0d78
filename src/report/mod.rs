//! Evaluation output: the metrics math ([`metrics`]), table IO ([`io`]), the
//! HTML report with inline SVG plots ([`html`], [`svg`]) and the terminal
//! metrics table `recflow show` ([`show`]).
pub mod io;
pub mod metrics;
