/**
 * The consoles plugin with a fake shell and layout restorer: what it saves for a
 * console tab is enough to open the same tab again after a reload.
 */
import {
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { CommandRegistry } from '@lumino/commands';
import { ReadonlyJSONObject } from '@lumino/coreutils';
import { Widget } from '@lumino/widgets';

import plugins, { CommandIDs, ConsoleTab, ITwargaConsoles } from '../index';

// No terminal on screen here (jsdom has no canvas): the tabs need only their URL.
jest.mock('@xterm/xterm', () => ({
  Terminal: jest.fn().mockImplementation(() => ({
    loadAddon: jest.fn(),
    onData: jest.fn(),
    open: jest.fn(),
    write: jest.fn(),
    focus: jest.fn(),
    dispose: jest.fn()
  }))
}));
jest.mock('@xterm/addon-fit', () => ({
  FitAddon: jest.fn().mockImplementation(() => ({ fit: jest.fn() }))
}));

interface IRestoreOptions {
  command: string;
  args: (tab: ConsoleTab) => ReadonlyJSONObject;
  name: (tab: ConsoleTab) => string;
}

/** A page: a command registry, a shell that keeps what it is given, a restorer. */
function page(): {
  app: JupyterFrontEnd;
  shown: Widget[];
  restores: IRestoreOptions[];
  consoles: ITwargaConsoles;
} {
  const shown: Widget[] = [];
  const restores: IRestoreOptions[] = [];
  const shell = {
    add: (widget: Widget) => shown.push(widget),
    activateById: jest.fn()
  };
  const app = {
    commands: new CommandRegistry(),
    shell
  } as unknown as JupyterFrontEnd;
  const restorer = {
    restore: async (_tracker: unknown, options: IRestoreOptions) => {
      restores.push(options);
    }
  } as unknown as ILayoutRestorer;
  const plugin = plugins.find(
    item => item.id === 'twarga-lab:consoles'
  ) as JupyterFrontEndPlugin<ITwargaConsoles>;
  const consoles = plugin.activate(app, restorer) as ITwargaConsoles;
  return { app, shown, restores, consoles };
}

afterEach(() => {
  jest.restoreAllMocks();
});

describe('twarga-lab:consoles', () => {
  it('is one of six plugins, each with an id and a description', () => {
    expect(plugins.map(plugin => plugin.id)).toEqual([
      'twarga-lab:model',
      'twarga-lab:panel',
      'twarga-lab:new-lab',
      'twarga-lab:consoles',
      'twarga-lab:launcher',
      'twarga-lab:status-bar'
    ]);
    plugins.forEach(plugin => expect(plugin.description).toBeTruthy());
  });

  it('opens one tab per VM, titled with its name', async () => {
    const { app, shown, consoles } = page();

    const tab = (await app.commands.execute(CommandIDs.openConsole, {
      id: 3,
      name: 'web-1'
    })) as ConsoleTab;
    const again = await app.commands.execute(CommandIDs.openConsole, {
      id: 3,
      name: 'web-1'
    });

    expect(again).toBe(tab);
    expect(shown).toEqual([tab]);
    expect(tab.title.label).toBe('Console: web-1');
    expect(tab.content.url).toMatch(/\/twarga\/api\/vms\/3\/console$/);
    expect(consoles.vms.has(tab)).toBe(true);
    tab.dispose();
    expect(consoles.vms.size).toBe(0);
  });

  it('saves a VM console by VM id, and its saved args open the same tab', async () => {
    const first = page();
    const tab = (await first.app.commands.execute(CommandIDs.openConsole, {
      id: 7,
      name: 'db-1'
    })) as ConsoleTab;
    const restore = first.restores.find(
      item => item.command === CommandIDs.openConsole
    );
    expect(restore).toBeDefined();
    const saved = { name: restore!.name(tab), args: restore!.args(tab) };
    expect(saved).toEqual({ name: 'vm-7', args: { id: 7, name: 'db-1' } });
    tab.dispose();

    // After the reload: a new page runs the saved command with the saved args.
    const second = page();
    const restored = (await second.app.commands.execute(
      restore!.command,
      saved.args
    )) as ConsoleTab;
    expect(restored.title.label).toBe('Console: db-1');
    expect(restored.content.url).toMatch(/\/twarga\/api\/vms\/7\/console$/);
    expect(second.consoles.vms.has(restored)).toBe(true);
    expect(restore!.name(restored)).toBe('vm-7');
    restored.dispose();
  });

  it('saves a terminado console by its path', async () => {
    const { app, restores } = page();
    const tab = (await app.commands.execute(CommandIDs.openTerminado, {
      path: 'terminals/websocket/1',
      label: 'Console: host terminal'
    })) as ConsoleTab;
    const restore = restores.find(
      item => item.command === CommandIDs.openTerminado
    );
    expect(restore!.args(tab)).toEqual({
      path: 'terminals/websocket/1',
      label: 'Console: host terminal'
    });
    expect(tab.content.url).toMatch(/\/terminals\/websocket\/1$/);
    tab.dispose();
  });

  it('refuses a VM id that is not one and a path off this server', async () => {
    const { app } = page();
    await expect(
      app.commands.execute(CommandIDs.openConsole, { id: 'x' })
    ).rejects.toThrow('needs a VM id');
    await expect(
      app.commands.execute(CommandIDs.openTerminado, {
        path: 'wss://elsewhere.example/ws'
      })
    ).rejects.toThrow('needs a path on this server');
  });
});
