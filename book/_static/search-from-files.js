/* Search when the book is opened from the file system (file://).
 *
 * Sphinx's search finds pages in searchindex.js, which loads from files too, but then fetches each
 * result page to show a summary under its title. Browsers refuse fetch() on file:// URLs, so every
 * result logged an error and the page raised "Failed to fetch". Opened from files, the results are
 * listed without summaries; served over http  (python -m http.server -d book/_build/html) they have them.
 */
if (window.location.protocol === "file:" && typeof DOCUMENTATION_OPTIONS !== "undefined") {
  DOCUMENTATION_OPTIONS.SHOW_SEARCH_SUMMARY = false;
}
