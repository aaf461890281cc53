// Drives berth's web UI in headless Chromium (playwright-core, Debian's chromium): signs
// in, browses to a repository and to an artifact with a referrer, checks that a form
// posted without its CSRF value is refused and that sign-out ends the session, and takes
// screenshots of the main pages. Usage: node ui.mjs BASE_URL ADMIN_PASSWORD
// Environment: PLAYWRIGHT_CORE (path of playwright-core's index.mjs), CHROMIUM (the browser),
// SCREENSHOTS (a directory to keep screenshots in; none kept without it).
import { pathToFileURL } from 'node:url';
import path from 'node:path';

const [base, password] = process.argv.slice(2);
const { chromium } = await import(pathToFileURL(process.env.PLAYWRIGHT_CORE).href);
const shots = process.env.SCREENSHOTS;

function check(condition, what) {
  if (!condition) {
    throw new Error(`check failed: ${what}`);
  }
  console.log(`ok: ${what}`);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await context.newPage();
  const shot = async (name) => {
    if (shots) await page.screenshot({ path: path.join(shots, `${name}.png`), fullPage: true });
  };

  let response = await page.goto(`${base}/`);
  check(page.url().endsWith('/ui/sign-in'), 'an anonymous visitor is sent to the sign-in page');
  const csp = response.headers()['content-security-policy'] || '';
  check(csp.includes("default-src 'none'") && !csp.includes('script-src'), 'pages carry a strict Content-Security-Policy');
  await shot('sign-in');

  await page.fill('input[name=user]', 'admin');
  await page.fill('input[name=password]', 'not the password');
  await page.click('button[type=submit]');
  check((await page.textContent('[role=alert]')).includes('Wrong user or password'), 'a wrong password is refused');

  await page.fill('input[name=user]', 'admin');
  await page.fill('input[name=password]', password);
  await page.click('button[type=submit]');
  await page.waitForURL(`${base}/`);
  check(await page.isVisible('a[href="/ui/projects/team"]'), 'the dashboard lists the project');
  await shot('dashboard');

  await page.click('a[href="/ui/projects/team"]');
  check(await page.isVisible('a[href="/ui/repositories/team/app"]'), 'the project page lists the repository');
  await shot('project');

  await page.click('a[href="/ui/repositories/team/app"]');
  const pull = await page.textContent('pre');
  check(pull.includes('docker pull') && pull.includes('/team/app:'), 'the repository page shows pull commands');
  await shot('repository');

  await page.click('tr:has(td:text-is("v1")) td.digest a');
  check((await page.textContent('main')).includes('application/vnd.example.signature'), 'the artifact page lists its signature');
  await shot('artifact');

  // A form posted from elsewhere carries no CSRF value: refused, the session kept.
  response = await page.request.post(`${base}/ui/sign-out`, { form: { csrf: 'forged' } });
  check(response.status() === 403, 'a sign-out without the CSRF value is refused');
  await page.goto(`${base}/`);
  check(await page.isVisible('a[href="/ui/projects/team"]'), 'the session survives the forged post');

  // A robot: its secret is shown once.
  await page.goto(`${base}/ui/projects/team`);
  await page.fill('input[name=name]', 'ci');
  await page.click('text=Create robot');
  const secret = (await page.textContent('pre.secret')).trim();
  check(secret.length >= 32, 'a new robot\'s secret is shown');
  await shot('robot-created');
  await page.goto(`${base}/ui/projects/team`);
  check(!(await page.textContent('main')).includes(secret) && (await page.textContent('main')).includes('robot$team+ci'),
        'the project lists the robot, never its secret again');
  await shot('project-admin');

  // Garbage collection, a dry run first.
  await page.goto(`${base}/ui/admin`);
  await page.click('button:has-text("Dry run")');
  await page.waitForURL(`${base}/ui/admin/gc`);
  check((await page.textContent('h1')).includes('what would go'), 'a garbage collection dry run reports');
  await shot('gc-dry-run');

  // A phone's width.
  await page.setViewportSize({ width: 390, height: 844 });
  await shot('dashboard-phone');
  await page.setViewportSize({ width: 1280, height: 800 });

  await page.click('text=Sign out');
  await page.waitForURL(`${base}/ui/sign-in`);
  response = await page.goto(`${base}/ui/projects/team`);
  check(response.status() === 401, 'after sign-out the project is closed again');

  const signIn = async (user, secret) => {
    await page.goto(`${base}/ui/sign-in`);
    await page.fill('input[name=user]', user);
    await page.fill('input[name=password]', secret);
    await page.click('button[type=submit]');
    await page.waitForURL(`${base}/`);
  };
  // A guest sees no delete buttons, and a deletion posted anyway is refused.
  await signIn('gus', 'gus-password');
  await page.goto(`${base}/ui/repositories/team/app`);
  check((await page.locator('text=Delete tag').count()) === 0, 'a guest is offered no deletion');
  const csrf = await page.getAttribute('input[name=csrf]', 'value');
  response = await page.request.post(`${base}/ui/repositories/team/app`,
    { form: { csrf, action: 'delete-tag', tag: 'v1' } });
  check(response.status() === 403, 'a guest\'s tag deletion is refused');
  await page.click('text=Sign out');

  // A maintainer deletes a tag.
  await signIn('mia', 'mia-password');
  await page.goto(`${base}/ui/repositories/team/app`);
  await page.click('button[aria-label="Delete tag old"]');
  await page.waitForURL(`${base}/ui/repositories/team/app`);
  const tags = await page.textContent('main');
  check(!tags.includes('old') && tags.includes('v1'), 'a maintainer deletes a tag');
} finally {
  await browser.close();
}
console.log('browser suite passed');
