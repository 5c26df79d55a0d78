//! Evaluation output: the metrics math ([`metrics`]), table IO ([`io`]), the
//! methods table shared by report and `show` ([`table`]), the HTML report
//! with inline SVG plots ([`html`], [`svg`]) and the terminal metrics table
//! `recflow show` ([`show`]), and the README's results tables generated
//! from committed locks ([`readme`]).
pub mod evaluate;
pub mod html;
pub mod io;
pub mod metrics;
pub mod paired;
pub mod readme;
pub mod show;
pub mod svg;
pub mod table;

pub use show::show;
