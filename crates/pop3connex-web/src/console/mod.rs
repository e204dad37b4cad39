//! Console page templates (maud): one function per page, each taking a
//! plain view struct built by the handlers in `pages` and returning the
//! whole HTML document.
