import { formatTimestamp } from '../format';

describe('formatTimestamp', () => {
  it('shows an ISO time in the browser time zone, to the second', () => {
    const iso = '2026-01-02T03:04:05+00:00';
    const date = new Date(iso);
    const pad = (n: number) => String(n).padStart(2, '0');
    expect(formatTimestamp(iso)).toBe(
      `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())} ` +
        `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`
    );
    expect(formatTimestamp(iso)).toMatch(/^\d{4}-\d\d-\d\d \d\d:\d\d:05$/);
  });

  it('leaves what is not a time as it is', () => {
    expect(formatTimestamp('soon')).toBe('soon');
  });
});
