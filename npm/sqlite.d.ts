import type { SenderStore, Recovered, Changes, CatchUpQuery, CatchUpRow, OutstandingQuery, ServerName } from './index.js';

/** Sender-owned state in SQLite through better-sqlite3 (a peer dependency, version 12). */
export class SqliteStore implements SenderStore {
  /** Opens or creates the file; throws ConfigError when better-sqlite3 is not installed. */
  static open(path: string): Promise<SqliteStore>;
  /** Over an open better-sqlite3 Database; tables are named `fedsend_*`. */
  constructor(db: unknown);
  loadRecovered(): Recovered;
  applyChanges(changes: Changes): void;
  catchUpRows(query: CatchUpQuery): CatchUpRow[];
  loadOutstanding(query: OutstandingQuery): ServerName[];
  close(): void;
}
