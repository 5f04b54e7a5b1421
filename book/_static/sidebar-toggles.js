/* The sidebar buttons (☰ for the chapter list, the page-contents button).
 *
 * sphinx-book-theme 1.3.0 renders its own ☰ and page-contents buttons in the article header, beside
 * the (hidden) ones of pydata-sphinx-theme 0.17.1's navbar. Both themes attach their click handlers
 * with document.querySelector(".primary-toggle") / (".secondary-toggle"), that is, to the first
 * button of each kind in the page: the hidden one. The visible buttons then do nothing: on a phone the
 * chapter list and the page contents cannot be opened, and on a desktop ☰ does not collapse the
 * sidebar.
 *
 * Fix: a click on any later button of a kind is handed to the first one, whose handlers (the
 * dialog on narrow screens, the collapse on wide ones) then run as the themes intended.
 * tests/test_book_browser.py checks this in headless Chromium at phone and desktop widths.
 */
document.addEventListener("DOMContentLoaded", () => {
  [".primary-toggle", ".secondary-toggle"].forEach((selector) => {
    const [bound, ...others] = document.querySelectorAll(selector);
    others.forEach((button) => {
      button.addEventListener("click", (event) => {
        event.preventDefault();
        event.stopPropagation();
        button.blur(); // the tooltip would otherwise stay
        bound.click();
      });
    });
  });
});
